"""Every workaround for a limit of TorchTitan 0.2.2 (or of the torch it runs on) lives here.

- `torchtitan_0_2_2`: the trainer, pipeline and DDP gradient scale, config manager,
  checkpointer, optimizer container and config, TrainSpec builder injection, context-parallel
  sharding, compile-cache, FSDP2 and log-format workarounds;
- `cpu`: the CPU/gloo fallback (stock TorchTitan 0.2.2 assumes an accelerator), including
  what it would log untruly there (an A100-based MFU, float32 autocast, timeout warnings).

Each monkeypatch, private call or subclass names the upstream limit it works around in one
line (the first line of its docstring, or a comment). The version check below runs before
either module is imported, so a TorchTitan upgrade fails loudly at import and each
workaround is revisited instead of silently patching code that has moved.
"""

from importlib.metadata import version

SUPPORTED_TORCHTITAN = "0.2.2"

if version("torchtitan") != SUPPORTED_TORCHTITAN:
    raise ImportError(
        f"torchtitan_mot supports torchtitan=={SUPPORTED_TORCHTITAN} only (installed: "
        f"{version('torchtitan')}); its workarounds in torchtitan_mot/compat target that release"
    )
