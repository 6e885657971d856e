"""What the benchmarks and the GPU acceptance check measure with: a model of any shape ready
to train outside the trainer, token counts for a modality mix, a timer that waits for the
device, packed documents with their document-causal mask (the sdpa reference for flex and
varlen attention), dynamo's compile counts, and the per-modality matmul microbenchmark (`F.linear` vs `mot::routed_mm` vs
`torch._grouped_mm`) that decides whether grouped GEMMs are worth their stacked weights.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.llama3.model.model import Transformer

from torchtitan_mot.model import MoTModelArgs, MoTTransformer
from torchtitan_mot.model.routing import routed_mm


def build_model(
    args: TransformerModelArgs, device: torch.device | str, dtype: torch.dtype
) -> nn.Module:
    """An initialised MoT model (for `MoTModelArgs`) or TorchTitan's Llama3 `Transformer`
    (for its plain arguments) on `device`, parameters in `dtype`.

    Only the parameters change dtype: `Module.to(dtype)` would also cast the complex RoPE
    table to a real dtype, dropping its imaginary part.
    """
    with torch.device(device):
        model = MoTTransformer(args) if isinstance(args, MoTModelArgs) else Transformer(args)
    with torch.no_grad():
        model.init_weights()
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


class CompileCounts(NamedTuple):
    """What dynamo compiled so far in this process.

    torch 2.13 keeps no recompile counter (`counters["recompiles"]` stays empty, and
    `counters["frames"]` skips fullgraph compiles); every compile, first or re-, adds a
    graph, so the recompiles of a span after warm-up are the graphs compiled in it.
    """

    graphs: int
    graph_breaks: int

    @classmethod
    def now(cls) -> CompileCounts:
        return cls(counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))

    def since(self, warm: CompileCounts) -> CompileCounts:
        return CompileCounts(*(a - b for a, b in zip(self, warm)))


def split_counts(fractions: torch.Tensor, total: int) -> list[int]:
    """Integer token counts per modality summing to `total` (largest remainder)."""
    exact = fractions * total
    counts = exact.floor().long()
    rest = total - int(counts.sum())
    counts[torch.argsort(exact - counts, descending=True)[:rest]] += 1
    return counts.tolist()


def median_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Median wall time of `fn()` in milliseconds, each call waited for on the device."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def matmul_microbench(
    in_features: int,
    out_features: int,
    tokens: int,
    fractions: list[float],
    device: torch.device,
    dtype: torch.dtype,
    iters: int = 10,
    warmup: int = 3,
) -> dict[str, float]:
    """Forward + backward median ms of one projection over `tokens` modality-sorted tokens.

    * `linear`: `F.linear` with one weight for all tokens, the dense twin's cost;
    * `routed_mm`: `mot::routed_mm`, one GEMM per modality slice (host offsets);
    * `grouped_mm`: `torch._grouped_mm` with device offsets, INCLUDING the `torch.stack` of
      the per-modality weights every call (the parameters stay separate tensors, as FSDP and
      the state-dict names need) and the stack's backward.
    Gradients are returned, never accumulated, so each variant does the same memory traffic.
    """
    n_mod = len(fractions)
    counts = split_counts(torch.tensor(fractions, dtype=torch.float64), tokens)
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    device_offsets = offsets.to(device)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(tokens, in_features, generator=gen) * in_features**-0.5).to(device, dtype)
    grad = torch.randn(tokens, out_features, generator=gen).to(device, dtype)
    weights = [
        (torch.randn(out_features, in_features, generator=gen) * in_features**-0.5)
        .to(device, dtype)
        .requires_grad_()
        for _ in range(n_mod)
    ]
    x.requires_grad_()

    def linear() -> None:
        out = F.linear(x, weights[0])
        torch.autograd.grad(out, [x, weights[0]], grad)

    def routed() -> None:
        out = routed_mm(x, weights, offsets)
        torch.autograd.grad(out, [x, *weights], grad)

    def grouped() -> None:
        stacked = torch.stack(weights).transpose(-2, -1)  # (n_mod, in, out)
        out = torch._grouped_mm(x, stacked, offs=device_offsets)
        torch.autograd.grad(out, [x, *weights], grad)

    return {
        name: median_ms(fn, device, iters, warmup)
        for name, fn in (("linear", linear), ("routed_mm", routed), ("grouped_mm", grouped))
    }


def packed_documents(batch: int, seq: int, eos_id: int, gen: torch.Generator) -> torch.Tensor:
    """Token ids with documents of random lengths (one ending exactly at a row's end)."""
    tokens = torch.randint(eos_id + 1, eos_id + 100, (batch, seq), generator=gen)
    for b in range(batch):
        pos = -1
        while True:
            pos += int(torch.randint(1, seq // 3, (1,), generator=gen))
            if pos >= seq:
                break
            tokens[b, pos] = eos_id
    tokens[0, -1] = eos_id
    return tokens


def document_causal_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(batch, 1, seq, seq) boolean: causal and within the same document (a document ends
    with its eos token), the sdpa reference."""
    doc = torch.cumsum(tokens == eos_id, dim=1)
    doc = doc - (tokens == eos_id).long()  # the eos token belongs to the document it ends
    seq = tokens.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=tokens.device).tril()
    same = doc.unsqueeze(2) == doc.unsqueeze(1)
    return (same & causal).unsqueeze(1)
