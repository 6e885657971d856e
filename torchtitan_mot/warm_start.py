"""Warm start an MoT model from a dense Llama3 checkpoint (or a Chameleon-setting MoT one).

    python -m torchtitan_mot.warm_start --dense DIR --flavor debugmodel \
        --config train_configs/debug_mot.toml --out DIR [--seed 0] [--force] [--untie ffn,norms]

`--dense` is either a TorchTitan DCP checkpoint folder (a `step-N` folder holding
`.metadata`; model-only or a full training checkpoint, of which only the model entries are
read) or a HuggingFace Llama folder of `*.safetensors` (converted with TorchTitan's
`Llama3StateDictAdapter.from_hf`). The output is a model-only MoT DCP checkpoint for
`--checkpoint.initial_load_path OUT`, in which every modality copy of every attention, FFN
and norm weight (only the components `--untie` / the config's `mot.untie` lists have
several copies) is the dense weight (so the MoT starts as exactly the dense model), the
embedding and output head are copied, and vocabulary rows the dense model lacks (modality
markers, codebooks) start at the mean dense row plus small seeded noise.

A flavor or config with MoE FFNs (`mot.moe_modalities`, the MoE-4x and hybrid flavors) is
upcycled (`upcycle_state_dict`): each expert of an MoE modality starts as that modality's FFN
plus small seeded noise, the router fresh; `--dense` may then also be an MoT DCP checkpoint
of the same flavor without MoE (its per-modality FFNs seed the experts). See docs/moe.md.

A Transfusion flavor (diffusion layers, a latent dataset in `--config`) warm starts from a
dense Llama3 or a Chameleon-setting MoT checkpoint of the same shape (`transfusion_state_dict`):
the transformer blocks load, the patch layers (`diffusion.*`) start at their own init under
`torch.manual_seed(--seed)`, only the text rows of the embedding and output head load (the
latent vocabulary has no discrete image codebook), the other rows start as above. See
docs/transfusion.md.

The MoT shapes come from `--config` and `--flavor` (the vocabulary size from the config's
tokenizer and codebooks, as in training). The output is written to a hidden temporary
sibling and renamed, so a failed or interrupted run leaves no half-written checkpoint at
`--out`; the same inputs give the same output.
"""

import argparse
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchtitan_mot import build_model_args
from torchtitan_mot.config import load_job_config
from torchtitan_mot.model import MoTModelArgs, MoTTransformer
from torchtitan_mot.model.args import VOCAB_ATTRIBUTE
from torchtitan_mot.model.diffusion import DiffusionLayers
from torchtitan_mot.model.state_dict_adapter import (
    transfusion_state_dict,
    untie_dense_state_dict,
    upcycle_state_dict,
    WarmStartError,
)

# Llama3 model entries of a DCP checkpoint; a training checkpoint also holds optimizer,
# lr_scheduler, dataloader and train_state entries, which warm start ignores.
_DENSE_MODEL_KEY = re.compile(r"^(tok_embeddings\.weight|norm\.weight|output\.weight|layers\.\d+\..+)$")


def load_dense_dcp(path: Path) -> dict[str, torch.Tensor]:
    """The model entries of a TorchTitan DCP checkpoint, as plain CPU tensors."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and _DENSE_MODEL_KEY.match(key)
    }
    if not state:
        raise WarmStartError(f"{path}: DCP checkpoint holds no Llama3 model entries")
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state


def load_dense_hf(path: Path, model_args: MoTModelArgs) -> dict[str, torch.Tensor]:
    """A HuggingFace Llama safetensors folder, converted to Llama3 names by TorchTitan."""
    from safetensors.torch import load_file
    from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter

    hf_sd: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        hf_sd.update(load_file(str(file)))
    adapter = Llama3StateDictAdapter(model_args, None)
    unknown = sorted(k for k in hf_sd if re.sub(r"\d+", "{}", k, count=1) not in adapter.from_hf_map)
    if unknown:
        raise WarmStartError(f"{path}: HF keys unknown to the Llama3 adapter: {', '.join(unknown)}")
    return adapter.from_hf(hf_sd)


def load_dense(path: Path, model_args: MoTModelArgs) -> dict[str, torch.Tensor]:
    """The dense model entries of a DCP step folder or a HuggingFace safetensors folder."""
    if (path / ".metadata").is_file():
        return load_dense_dcp(path)
    if any(path.glob("*.safetensors")):
        return load_dense_hf(path, model_args)
    steps = sorted(p.name for p in path.glob("step-*"))
    hint = f" (it holds {', '.join(steps)}: pass one of them)" if steps else ""
    raise WarmStartError(
        f"{path} is neither a DCP checkpoint (no .metadata) nor a HuggingFace folder "
        f"(no *.safetensors){hint}"
    )


def mot_target(
    config: Path, flavor: str, untie: list[str] | None = None
) -> tuple[MoTModelArgs, dict[str, torch.Tensor]]:
    """(model args, meta-device MoT state dict) for `flavor` under the job config `config`
    (`untie`, if given, overrides the config's `mot.untie`)."""
    model_args, target, _ = _target(config, flavor, untie)
    return model_args, target


def _target(
    config: Path, flavor: str, untie: list[str] | None
) -> tuple[MoTModelArgs, dict[str, torch.Tensor], int]:
    """`mot_target` plus the text vocabulary size of the config's unified vocabulary."""
    argv = ["--job.config_file", str(config), "--model.flavor", flavor]
    job_config = load_job_config(argv, read_data=False)
    if job_config.mot.diffusion_modalities:
        # The patch layers' width is the dataset's latent shape: read its meta.json (an
        # error if it is not here) instead of check_plan's placeholder shape.
        job_config = load_job_config(argv, read_data=True)
    if untie is not None:
        job_config.mot.untie = list(untie)
    model_args = build_model_args(job_config)
    with torch.device("meta"):
        model = MoTTransformer(model_args)
    return model_args, model.state_dict(), getattr(job_config.mot, VOCAB_ATTRIBUTE).text_vocab_size


def fresh_diffusion_state_dict(model_args: MoTModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """The patch layers' own init (`DiffusionLayers.init_weights`) under `torch.manual_seed(seed)`,
    with their model keys (`diffusion.*`); the global RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = DiffusionLayers(model_args)
        layers.init_weights()
    return {f"diffusion.{k}": v for k, v in layers.state_dict().items()}


def check_out(out: Path, force: bool) -> None:
    """Refuse a non-empty `out` without `force`, before any work is done."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise WarmStartError(f"{out} exists and is not empty; pass --force to replace it")


def save_atomically(state: dict[str, torch.Tensor], out: Path) -> None:
    """Save `state` as DCP under a hidden sibling of `out`, then rename it to `out`.

    A failed or interrupted save leaves no folder at `out` that looks like a checkpoint, and
    an existing `out` is replaced only once the new checkpoint is complete.
    """
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed run with the same pid
    try:
        dcp.save(state, checkpoint_id=str(tmp), no_dist=True)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def warm_start(
    dense: Path, config: Path, flavor: str, out: Path, seed: int = 0, force: bool = False,
    untie: list[str] | None = None,
) -> MoTModelArgs:
    """Write the MoT checkpoint of `dense` to `out`; returns the MoT args it was built for."""
    check_out(out, force)
    model_args, target, text_vocab = _target(config, flavor, untie)
    if model_args.diffusion and model_args.moe_modalities:
        raise WarmStartError(f"{flavor}: warm start of a Transfusion flavor with MoE FFNs is not supported")
    source = load_dense(dense, model_args)
    if model_args.diffusion:
        fresh = fresh_diffusion_state_dict(model_args, seed)
        state = transfusion_state_dict(source, target, fresh, text_vocab, seed=seed)
    elif model_args.moe_modalities:
        state = upcycle_state_dict(source, target, model_args, seed=seed)
    else:
        state = untie_dense_state_dict(source, target, seed=seed)
    save_atomically(state, out)
    return model_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_mot.warm_start",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", type=Path, required=True, help="DCP step folder (dense Llama3, or a Chameleon-setting MoT for a Transfusion flavor) "
                             "or HF safetensors folder")
    parser.add_argument("--flavor", required=True, help="MoT flavor, e.g. debugmodel")
    parser.add_argument("--config", type=Path, required=True, help="job config TOML (tokenizer, codebooks)")
    parser.add_argument("--out", type=Path, required=True, help="output DCP folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise in new vocabulary rows (and of a Transfusion flavor's patch layers)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--untie", type=lambda s: s.split(","), default=None,
                        help="comma-separated components with per-modality copies, e.g. ffn,norms "
                             "(default: the config's mot.untie); train with the same --mot.untie")
    args = parser.parse_args(argv)
    try:
        model_args = warm_start(args.dense, args.config, args.flavor, args.out, args.seed,
                                args.force, args.untie)
    except ValueError as e:  # WarmStartError and the config's own checks: the message names it
        raise SystemExit(f"warm_start: {e}") from e
    print(f"wrote MoT checkpoint ({args.flavor}, {model_args.n_modalities} modalities, "
          f"untied {model_args.untie}, vocab {model_args.vocab_size}) to {args.out}")


if __name__ == "__main__":
    main()
