"""`torchtitan_mot.benchmark.perf`: the helpers behind the benchmark and the GPU acceptance tests."""

import dataclasses

import torch
from torch.nn.attention.flex_attention import and_masks
from torchtitan.models.attention import (
    create_varlen_metadata_for_document,
    get_causal_mask_mod,
    get_document_mask_mod,
)
from torchtitan.models.llama3.model.args import TransformerModelArgs

from torchtitan_mot.model import MoTModelArgs
from torchtitan_mot.benchmark.perf import (
    CompileCounts,
    build_model,
    document_causal_mask,
    matmul_microbench,
    packed_documents,
    split_counts,
)


def test_document_causal_mask_is_torchtitans() -> None:
    """The sdpa reference of the GPU attention stage is TorchTitan's causal AND document
    mask_mod (the flex path's mask), evaluated at every (batch, q, kv), and its documents
    are the varlen path's cu_seqlens."""
    tokens = packed_documents(3, 96, eos_id=0, gen=torch.Generator().manual_seed(0))
    assert int((tokens == 0).sum()) >= 6
    mask_mod = and_masks(get_causal_mask_mod(), get_document_mask_mod(tokens, 0))
    b, q, kv = torch.meshgrid(torch.arange(3), torch.arange(96), torch.arange(96), indexing="ij")
    expected = mask_mod(b, torch.zeros_like(b), q, kv)
    mask = document_causal_mask(tokens, 0)
    assert mask.shape == (3, 1, 96, 96)
    assert torch.equal(mask[:, 0], expected)
    # Each row's document boundaries: where a query stops seeing key 0 of its row.
    cu = create_varlen_metadata_for_document(tokens, 0).cu_seq_q
    starts = [int(s) % 96 for s in cu[:-1].tolist()]
    for row in range(3):
        first_keys = mask[row, 0].int().argmax(dim=1)  # each query's document start
        assert set(first_keys.tolist()) == {s for s, r in zip(starts, cu[:-1].tolist())
                                            if r // 96 == row}


def test_split_counts() -> None:
    assert split_counts(torch.tensor([0.7, 0.28, 0.02]), 8192) == [5734, 2294, 164]
    assert sum(split_counts(torch.tensor([1 / 3] * 3), 100)) == 100


def test_build_model_mot_and_llama3() -> None:
    """Same shape, same non-embedding parameter count for the dense twin and Llama3; the RoPE
    table keeps its complex dtype when the parameters go to bf16."""
    args = MoTModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=16,
                        n_modalities=1)
    llama = TransformerModelArgs(**{f.name: getattr(args, f.name)
                                    for f in dataclasses.fields(TransformerModelArgs)})
    dense, ref = build_model(args, "cpu", torch.bfloat16), build_model(llama, "cpu", torch.bfloat16)
    assert type(ref).__name__ == "Transformer"
    assert sum(p.numel() for p in dense.parameters()) == sum(p.numel() for p in ref.parameters())
    assert all(p.dtype == torch.bfloat16 for p in dense.parameters())
    assert dense.freqs_cis.is_complex() and ref.freqs_cis.is_complex()


def test_matmul_microbench_runs_all_three() -> None:
    times = matmul_microbench(32, 48, 64, [0.7, 0.28, 0.02], torch.device("cpu"),
                              torch.float32, iters=2, warmup=1)
    assert set(times) == {"linear", "routed_mm", "grouped_mm"}
    assert all(t > 0 for t in times.values())


def test_compile_counts_see_a_recompile() -> None:
    """A guard failure (a new Python int under dynamic=False) compiles the frame again: one more
    graph, which is what benchmark and acceptance report as a recompile."""
    torch._dynamo.reset()

    @torch.compile(backend="eager", dynamic=False, fullgraph=True)
    def scale(x: torch.Tensor, n: int) -> torch.Tensor:
        return x * n

    scale(torch.ones(3), 2)
    warm = CompileCounts.now()
    scale(torch.ones(3), 2)
    assert CompileCounts.now().since(warm) == CompileCounts(0, 0)
    scale(torch.ones(3), 3)
    assert CompileCounts.now().since(warm) == CompileCounts(graphs=1, graph_breaks=0)
