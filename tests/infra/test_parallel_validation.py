"""Shardings that cannot work are refused at start-up, naming the setting."""

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims

from torchtitan_mot.infra.parallelize import parallelize_mot
from torchtitan_mot.model import MoTModelArgs, MoTTransformer

ARGS = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64)


def _parallelize(seq_len: int = 64, args: dict | None = None, async_tp: bool = False,
                 converters: tuple[str, ...] = (), compile_model: bool = False,
                 validation_seq_len: int | None = None, **degrees) -> None:
    d = dict(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1) | degrees
    world = d["dp_replicate"] * d["dp_shard"] * d["cp"] * d["tp"] * d["pp"]
    pd = ParallelDims(**d, ep=1, etp=1, world_size=world)
    if dist.is_initialized():
        pd.build_mesh()
    jc = JobConfig()
    jc.training.seq_len = seq_len
    if validation_seq_len is not None:
        jc.validation.enable = True
        jc.validation.seq_len = validation_seq_len
    jc.parallelism.tensor_parallel_degree = d["tp"]
    jc.parallelism.pipeline_parallel_degree = d["pp"]
    jc.parallelism.context_parallel_degree = d["cp"]
    jc.parallelism.enable_async_tensor_parallel = async_tp
    jc.model.converters = list(converters)
    jc.compile.enable = compile_model
    with torch.device("meta"):
        model = MoTTransformer(MoTModelArgs(**(ARGS | (args or {}))))
    if "quantize.linear.float8" in converters:
        from torchao.float8 import convert_to_float8_training, Float8LinearConfig

        convert_to_float8_training(model, config=Float8LinearConfig(emulate=True),
                                   module_filter_fn=lambda mod, fqn: fqn != "output")
    parallelize_mot(model, pd, jc)


@pytest.mark.parametrize("degree", ["tp", "pp"])
def test_ddp_with_tp_or_pp_is_refused(degree: str) -> None:
    """DDP (replicate without shard) on a 2-D mesh: refused, naming the setting. The check
    needs the real mesh, so the ranks are simulated with a fake process group (rank 0 of 4).
    (With CP TorchTitan shards over the cp ranks, so replicate x cp is HSDP, not DDP.)"""
    dist.init_process_group("fake", rank=0, world_size=4, store=FakeStore())
    try:
        with pytest.raises(ValueError, match=r"data_parallel_replicate_degree without "
                           r"data_parallel_shard_degree \(DDP\) cannot be combined with tensor/pipeline/context"):
            _parallelize(dp_replicate=2, **{degree: 2})
    finally:
        dist.destroy_process_group()


def test_tp_must_divide_heads() -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel_degree=4 must divide .*n_kv_heads=2"):
        _parallelize(tp=4)
    with pytest.raises(ValueError, match=r"tensor_parallel_degree=3 must divide n_heads=4"):
        _parallelize(seq_len=96, tp=3)


def test_seq_len_must_split_over_tp_and_cp() -> None:
    with pytest.raises(ValueError, match=r"training.seq_len=30 must be divisible .* = 4"):
        _parallelize(seq_len=30, tp=2)
    with pytest.raises(ValueError, match=r"training.seq_len=36 must be divisible .* = 8"):
        _parallelize(seq_len=36, cp=2, tp=2)
    with pytest.raises(ValueError, match=r"validation.seq_len=30 must be divisible .* = 4"):
        _parallelize(seq_len=64, validation_seq_len=30, tp=2)


def test_pp_must_not_exceed_layers() -> None:
    with pytest.raises(ValueError, match=r"pipeline_parallel_degree=8 exceeds n_layers=4"):
        _parallelize(pp=8)


def test_cp_refuses_varlen_attention() -> None:
    with pytest.raises(ValueError, match=r"context_parallel_degree=2 needs attn_type sdpa or flex"):
        _parallelize(cp=2, args=dict(attn_type="varlen", attn_mask_type="block_causal"))


def test_async_tp_is_refused() -> None:
    with pytest.raises(ValueError, match=r"enable_async_tensor_parallel is not supported"):
        _parallelize(tp=2, async_tp=True)


FLOAT8 = ("quantize.linear.float8",)


def test_float8_with_compile_or_tp_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model.converters \['quantize.linear.float8'\] with compile.enable"):
        _parallelize(converters=FLOAT8, compile_model=True)
    with pytest.raises(ValueError, match=r"quantize.linear.float8'\] with tensor_parallel_degree=2"):
        _parallelize(converters=FLOAT8, tp=2)
    _parallelize(converters=FLOAT8)  # eager, FSDP/DDP/single device: accepted


def test_quantizers_that_do_nothing_for_mot_are_refused() -> None:
    with pytest.raises(ValueError, match=r"quantize.grouped_mm.float8'\]: grouped-GEMM quantization"):
        _parallelize(converters=("quantize.grouped_mm.float8",))
    with pytest.raises(ValueError, match=r"converted no per-modality projection"):
        _parallelize(converters=("quantize.linear.mx",))  # named, but no Linear was swapped
