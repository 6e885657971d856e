"""Warm start on sharded (DTensor) state: two gloo ranks, FSDP2-sharded dense Llama3 weights.

The mapping must give, on every rank, the same values (and the same placements) as the
plain-tensor mapping of the unsharded state dict, grown vocabulary rows included.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torchtitan.models.llama3 import Transformer, TransformerModelArgs

from torchtitan_mot.model import MoTModelArgs, MoTTransformer
from torchtitan_mot.model.state_dict_adapter import untie_dense_state_dict

SHAPE = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, rope_theta=500000, max_seq_len=16)
DENSE_VOCAB, MOT_VOCAB = 64, 70


def _worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        dense = Transformer(TransformerModelArgs(vocab_size=DENSE_VOCAB, **SHAPE))
        with torch.no_grad():
            dense.init_weights()
        full_sd = {k: v.clone() for k, v in dense.state_dict().items()}
        with torch.device("meta"):
            mot = MoTTransformer(MoTModelArgs(vocab_size=MOT_VOCAB, n_modalities=2, **SHAPE))
        expected = untie_dense_state_dict(full_sd, mot.state_dict(), seed=3)

        for block in dense.layers.values():
            fully_shard(block)
        fully_shard(dense)
        sharded_sd = dense.state_dict()
        assert all(isinstance(v, DTensor) for v in sharded_sd.values())
        got = untie_dense_state_dict(sharded_sd, mot.state_dict(), seed=3)

        assert set(got) == set(expected)
        for key, value in got.items():
            assert isinstance(value, DTensor), key
            assert value.placements == (Shard(0),), (key, value.placements)
            torch.testing.assert_close(value.full_tensor(), expected[key], rtol=0, atol=0)
        # No rank tears gloo down while its peer still has a collective in flight (CI once saw
        # a rank abort in teardown: "terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_warm_start_of_fsdp_sharded_state_equals_unsharded(tmp_path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
