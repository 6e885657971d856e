"""Shardings that cannot work are refused at start-up, naming the setting."""

import pytest
import torch
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims

from torchtitan_mot.infra.parallelize import parallelize_mot
from torchtitan_mot.model import MoTModelArgs, MoTTransformer

ARGS = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64)


def _parallelize(seq_len: int = 64, args: dict | None = None, async_tp: bool = False,
                 converters: tuple[str, ...] = (), compile_model: bool = False,
                 **degrees) -> None:
    d = dict(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1) | degrees
    world = d["dp_replicate"] * d["dp_shard"] * d["cp"] * d["tp"] * d["pp"]
    pd = ParallelDims(**d, ep=1, etp=1, world_size=world)
    jc = JobConfig()
    jc.training.seq_len = seq_len
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
