"""The compiled model has no data-dependent shapes and reads no scalar back to the host.

A boolean-mask MoT (`x[mask]` per projection) gives every batch a new shape, so a compiled
block graph-breaks or recompiles whenever the modality mix changes, and eager syncs the host
on every projection. Here the mix lives only in tensor VALUES (the sort permutation and the
offsets fed to the opaque `mot::routed_mm`), so one graph serves every batch.
"""

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from torchtitan_mot.model.inputs import HostTensor
from torchtitan_mot.model import MoTModelArgs, MoTTransformer
from torchtitan_mot.model.routing import build_routing
from torchtitan_mot.benchmark.perf import CompileCounts

SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, rope_theta=500000,
             max_seq_len=32)
BATCH, SEQ, N_MOD = 2, 32, 3


def _mixes() -> list[torch.Tensor]:
    """Modality ids with different counts per modality, including absent modalities."""
    g = torch.Generator().manual_seed(0)
    return [
        torch.randint(0, N_MOD, (BATCH, SEQ), generator=g),
        torch.zeros(BATCH, SEQ, dtype=torch.long),
        torch.full((BATCH, SEQ), N_MOD - 1),
        torch.randint(1, N_MOD, (BATCH, SEQ), generator=g),
        (torch.arange(SEQ) >= SEQ // 4).long().expand(BATCH, SEQ).contiguous(),
    ]


def _model() -> MoTTransformer:
    torch.manual_seed(0)
    model = MoTTransformer(MoTModelArgs(n_modalities=N_MOD, **SHAPE))
    with torch.no_grad():
        model.init_weights()
    return model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_block_compiles_once_without_graph_breaks() -> None:
    """One fullgraph block, five different mixes, forward and backward: one graph, no
    recompile, no graph break."""
    model = _model()
    block = model.layers["0"]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    freqs_cis = model.freqs_cis[:SEQ]
    x = torch.randn(BATCH * SEQ, SHAPE["dim"])
    for ids in _mixes():
        routing = build_routing(ids, N_MOD)
        h = routing.sort(x).requires_grad_()
        out = compiled(h, routing, (BATCH, SEQ), freqs_cis, None)
        torch.testing.assert_close(out, block(h, routing, (BATCH, SEQ), freqs_cis, None))
        out.sum().backward()
    assert CompileCounts.now() == CompileCounts(graphs=1, graph_breaks=0), dict(counters)


def test_whole_forward_traces_in_one_graph() -> None:
    """Routing included, the whole forward is one fullgraph trace for every mix: the sort,
    counts and offsets are computed with static shapes. (On torch 2.13 dynamo traces
    `.item()` even with capture_scalar_outputs=False, so host reads are caught by
    `test_no_scalar_reads_outside_routed_mm` instead.)"""
    model = _model()
    tokens = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ))
    with torch._dynamo.config.patch(
        capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False
    ):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        for ids in _mixes():
            out = compiled(tokens, modality_ids=ids)
            torch.testing.assert_close(out, model(tokens, modality_ids=ids))
    assert CompileCounts.now() == CompileCounts(graphs=1, graph_breaks=0), dict(counters)


class _ScalarReads(TorchDispatchMode):
    """Counts device->host scalar reads (`.item()`, `.tolist()`, `bool(t)` all lower to
    `aten._local_scalar_dense`). Ops called inside an op the mode sees (the body of
    `mot::routed_mm`) are not visited: the custom op is opaque here, as to the compiler."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.routed_mm_calls = 0
        self.offsets_seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        if func._schema.name.startswith("mot::routed_mm"):
            self.routed_mm_calls += 1
            offsets = args[3] if func._schema.name == "mot::routed_mm_backward" else args[2]
            assert offsets.device.type == "cpu", "routed_mm must get host-side offsets"
            self.offsets_seen.add(id(offsets))
        return func(*args, **(kwargs or {}))


def test_no_scalar_reads_outside_routed_mm() -> None:
    """Routing and every block, forward and backward, read no scalar back to the host. The
    routed matmuls (forward and backward) all read ONE host-side offsets tensor, made by
    `build_routing`, so on a GPU the blocks never wait for the device."""
    model = _model()
    tokens = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ))
    for ids in _mixes():
        with _ScalarReads() as mode:
            routing = build_routing(ids, N_MOD)
            h = routing.sort(model.tok_embeddings(tokens).flatten(0, 1))
            for block in model.layers.values():
                h = block(h, routing, (BATCH, SEQ), model.freqs_cis[:SEQ], None)
            routing.unsort(h).sum().backward()
        assert mode.reads == 0
        assert mode.routed_mm_calls == 2 * 7 * SHAPE["n_layers"]  # forward + backward
        assert mode.offsets_seen == {id(routing.offsets)}
    with _ScalarReads() as control:  # the detector does see a host read
        torch.ones(2).sum().item()
    assert control.reads == 1


def test_host_ids_spare_the_forward_any_device_read() -> None:
    """With the ids in host memory (`HostTensor`, as the trainer passes them), a whole forward
    and backward (routing, blocks, head) reads nothing back from the model's device. The model runs on the
    meta device, whose tensors hold no data: any device->host read (`.item()`, `.tolist()`,
    `.cpu()`, a data-dependent output size) would raise."""
    with torch.device("meta"):
        model = MoTTransformer(MoTModelArgs(n_modalities=N_MOD, qk_norm=True, **SHAPE))
    tokens = torch.empty(BATCH, SEQ, dtype=torch.long, device="meta")
    for ids in _mixes():
        logits = model(tokens, modality_ids=HostTensor(ids))
        logits.sum().backward()
        assert logits.device.type == "meta"
        assert logits.shape == (BATCH, SEQ, SHAPE["vocab_size"])
    assert all(p.grad is not None for p in model.parameters())
    # The detector: reading data back from the meta device fails, as it would have to for
    # ids that live on the device (their group sizes must come back to the host).
    with pytest.raises(NotImplementedError):
        model(tokens, modality_ids=_mixes()[0].to("meta"))

