"""Activation checkpointing through parallelize_mot really recomputes MoT blocks.

Counted with a dispatch mode: routed per-modality matmuls (`mot::routed_mm` and
`mot::routed_mm_recompute`, 7 per block) and SiLU forwards (1 per block) that run again
during backward. Selective op AC recomputes wk, wo and w3 (Llama3's every other mm).
"""

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils._python_dispatch import TorchDispatchMode
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims

from torchtitan_mot.infra.parallelize import parallelize_mot
from torchtitan_mot.model import MoTModelArgs, MoTTransformer

ARGS = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32,
            rope_theta=500000, n_modalities=2)


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.mm = self.silu = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.mm += func in (torch.ops.mot.routed_mm.default, torch.ops.mot.routed_mm_recompute.default)
        self.silu += func is torch.ops.aten.silu.default
        return func(*args, **(kwargs or {}))


def _run(mode: str, option: str = "op") -> tuple[int, int, int, list[torch.Tensor], torch.nn.Module]:
    torch.manual_seed(0)
    model = MoTTransformer(MoTModelArgs(**ARGS))
    with torch.no_grad():
        model.init_weights()
    jc = JobConfig()
    jc.activation_checkpoint.mode = mode
    jc.activation_checkpoint.selective_ac_option = option
    jc.training.seq_len = 32
    pd = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    model = parallelize_mot(model, pd, jc)
    tokens = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 2, (2, 32), generator=torch.Generator().manual_seed(2))
    fwd = _Count()
    with fwd:
        loss = model(tokens, modality_ids=ids).square().mean()
    bwd = _Count()
    with bwd:
        loss.backward()
    grads = [p.grad for p in model.parameters()]
    return fwd.mm, bwd.mm, bwd.silu, grads, model


@pytest.mark.parametrize(
    "mode,option,recomputed_mm,recomputed_silu,wrapped",
    [
        ("none", "op", 0, 0, 0),
        ("full", "op", 28, 4, 4),
        ("selective", "2", 14, 2, 2),  # every second block, fully
        ("selective", "op", 4 * 3, 4, 4),  # wk, wo, w3 and cheap ops recomputed
    ],
)
def test_checkpointing_recomputes_blocks(mode, option, recomputed_mm, recomputed_silu, wrapped):
    fwd_mm, bwd_mm, bwd_silu, grads, model = _run(mode, option)
    assert fwd_mm == 4 * 7
    assert (bwd_mm, bwd_silu) == (recomputed_mm, recomputed_silu)
    assert sum(isinstance(b, CheckpointWrapper) for b in model.layers.values()) == wrapped
    for got, want in zip(grads, _run("none")[3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
