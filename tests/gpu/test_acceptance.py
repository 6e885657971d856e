"""GPU acceptance: stage by stage, whether the CUDA path works. Each stage is a test marked
`gpu` (tests/gpu/conftest.py: the device, the time limit, the CPU smoke mode);
`python scripts/gpu_acceptance.py` selects them and prints the table and
`gpu acceptance: N/M passed`.

Single-GPU stages:
  1. model: the 3-modality debug model in pure bf16 and under bf16 autocast, eager vs
     per-block compiled (fullgraph, as the trainer compiles), five modality mixes (an absent
     modality, a one-token modality, counts that are not multiples of 8); 0 recompiles and 0
     graph breaks after the first mix; then a forward+backward under
     `torch.cuda.set_sync_debug_mode("error")` (any device->host sync raises);
  2. flex and varlen document-causal attention, forward and backward, against sdpa with the
     same block-diagonal causal mask (the masks built by TorchTitan's own mask builders);
  3. the real trainer: debug_mot_3modality, 20 steps, compile, validation every 10 steps,
     TorchTitan's default bf16 mixed precision; again with selective op AC;
  4. FSDP2 on a one-rank NCCL mesh (bf16 params, fp32 reduce) against the autocast run;
     float8 (torchao, SM89+) on a 1B-class shape;
  5. microbenchmark at 8B projection shapes, 8192 tokens, bf16, forward+backward:
     `F.linear` vs `mot::routed_mm` vs `torch._grouped_mm` (stacking included);
  6. `python -m torchtitan_mot.benchmark` at a 1B-class shape (dim 2048, 16 layers, seq 4096,
     compile, bf16): TorchTitan's Llama3, the dense twin and MoT with 2 and 3 modalities;
  7. twins with the same weights under bf16 autocast, each judged by 3x its reference's own
     bf16 error (the reference's autocast run against its fp32 run; loss, outputs, every
     parameter's gradient): a. the MoT+MoE hybrid with TorchTitan's `torch._grouped_mm`
     experts (SM90+) vs its for-loop experts, five modality mixes, the MoE modality absent in
     one and a single token in another; b. the Transfusion model with flex attention
     (TorchTitan's FlexAttentionWrapper, the (causal OR same image) AND same document block
     mask) vs sdpa with the explicit mask, two batches of long text runs and images.
Every stage has its own time limit (its marker's `timeout`; the limits add up to 570 s,
under 10 minutes).
A stage that cannot run here (no GPU, an older GPU, a missing optional package) skips with
the reason.

Multi-GPU stages (also marked `multi_gpu`) launch the trainer with torchrun on this node for
each parallelism and compare its per-step losses with a one-GPU run of the same config, seed
and data (fp32, deterministic).

In the CPU smoke mode the same stages run on the CPU at tiny shapes (per-block compile with
the aot_eager backend, to stay fast; the trainer and benchmark stages without compile);
stages 2 and 7 skip (CUDA kernels: flex attention's backward, varlen, grouped_mm's padding).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness.data import repeated_dataset
from harness.feature_matrix import FEATURE_SETS, FeatureMatrix, summary_line
from harness.gpu import Context
from harness.trainer import REPO, run_trainer, trainer_env
from helpers import transfusion_batch
from torch._dynamo.utils import counters

from torchtitan_mot import mot_args
from torchtitan_mot.benchmark.perf import (
    build_model,
    CompileCounts,
    document_causal_mask,
    matmul_microbench,
    packed_documents,
)
from torchtitan_mot.infra.modality_ids import HostTensor
from torchtitan_mot.model import MoTModelArgs
from torchtitan_mot.model.moe import grouped_mm_available
from torchtitan_mot.model.routing import routed_mm

EIGHT_B = mot_args["8B_2modality"]


def stage(name: str, timeout: float, multi_gpu: bool = False) -> list[pytest.MarkDecorator]:
    """The marks of one acceptance stage: its table name and time limit on a GPU."""
    return [pytest.mark.gpu(stage=name, timeout=timeout)] + ([pytest.mark.multi_gpu] if multi_gpu else [])


def tiny_3modality() -> MoTModelArgs:
    return dataclasses.replace(mot_args["debugmodel_3modality"], dim=64, n_layers=2, n_heads=4,
                               n_kv_heads=2)


def five_mixes(batch: int, seq: int, n_mod: int, gen: torch.Generator) -> list[torch.Tensor]:
    """(batch, seq) modality ids: a random mix, modality n-1 absent, modality n-1 with ONE
    token, per-modality counts that are odd (not multiples of 8), and contiguous segments."""
    total = batch * seq
    random = torch.randint(0, n_mod, (total,), generator=gen)
    absent = torch.randint(0, n_mod - 1, (total,), generator=gen)
    one_token = absent.clone()
    one_token[int(torch.randint(0, total, (1,), generator=gen))] = n_mod - 1
    odd = torch.cat([torch.full((c,), m) for m, c in enumerate(_odd_counts(total, n_mod))])
    odd = odd[torch.randperm(total, generator=gen)]
    segments = (torch.arange(total) // max(1, seq // 4)) % n_mod
    return [ids.view(batch, seq) for ids in (random, absent, one_token, odd, segments)]


def _odd_counts(total: int, n_mod: int) -> list[int]:
    """Near-equal counts summing to `total`, none a multiple of 8."""
    counts = [total // n_mod // 8 * 8 + 3 + 2 * m for m in range(n_mod - 1)]
    last = total - sum(counts)
    if last % 8 == 0:
        counts[0], last = counts[0] + 1, last - 1
    return counts + [last]


@contextlib.contextmanager
def autocast_if(enabled: bool, device: torch.device) -> Iterator[None]:
    with torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext():
        yield


def _loss(model: torch.nn.Module, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logits = model(tokens, modality_ids=HostTensor(ids))
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens.roll(-1, 1).flatten())


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([
        (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().flatten()
        for p in model.parameters()
    ])


# --- stage 1: the model ----------------------------------------------------------------------


def stage_model(ctx: Context, mode: str) -> str:
    """Eager vs compiled over five mixes; compile counters; a sync-free step on CUDA.

    `mode` "bf16": parameters and activations in bf16. "autocast": fp32 parameters under
    bf16 autocast (what a single-GPU trainer run does; CPU autocast runs it too)."""
    args = tiny_3modality() if ctx.smoke else mot_args["debugmodel_3modality"]
    batch, seq = (2, 64) if ctx.smoke else (4, 2048)
    args = dataclasses.replace(args, vocab_size=2048, max_seq_len=seq)
    torch.manual_seed(0)
    model = build_model(args, ctx.device, torch.bfloat16 if mode == "bf16" else torch.float32)
    autocast = mode == "autocast"
    gen = torch.Generator().manual_seed(0)
    mixes = five_mixes(batch, seq, args.n_modalities, gen)
    tokens = torch.randint(0, args.vocab_size, (batch, seq), generator=gen).to(ctx.device)

    def run(ids: torch.Tensor) -> tuple[float, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with autocast_if(autocast, ctx.device):
            loss = _loss(model, tokens, ids)
        loss.backward()
        return loss.item(), _grads(model)

    eager = [run(ids) for ids in mixes]
    from torchtitan.config.job_config import Compile as CompileConfig
    from torchtitan.models.llama3.infra.parallelize import apply_compile

    torch._dynamo.reset()
    counters.clear()
    apply_compile(model, CompileConfig(enable=True, components=["model"],
                                       backend="aot_eager" if ctx.smoke else "inductor"))
    worst_loss = worst_grad = 0.0
    for i, ids in enumerate(mixes):
        loss, grads = run(ids)
        if i == 0:
            warm = CompileCounts.now()
        ref_loss, ref_grads = eager[i]
        if not (math.isfinite(loss) and bool(torch.isfinite(grads).all())):
            raise AssertionError(f"mix {i}: non-finite loss or gradients (loss {loss})")
        worst_loss = max(worst_loss, abs(loss - ref_loss) / abs(ref_loss))
        worst_grad = max(worst_grad, float((grads - ref_grads).norm() / ref_grads.norm()))
    end = CompileCounts.now()
    new_graphs, breaks = end.since(warm).graphs, end.graph_breaks
    # bf16 eager and compiled kernels round differently; fp32 would agree to ~1e-6.
    tol_loss, tol_grad = 1e-2, 5e-2
    figures = (f"loss rel diff {worst_loss:.1e}, grad rel diff {worst_grad:.1e}, "
               f"recompiles (new graphs) {new_graphs}, graph breaks {breaks}")
    if worst_loss > tol_loss or worst_grad > tol_grad:
        raise AssertionError(f"compiled != eager beyond ({tol_loss}, {tol_grad}): {figures}")
    if new_graphs or breaks:
        raise AssertionError(f"compile not stable across mixes: {figures}")
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.zero_grad(set_to_none=True)
            with autocast_if(autocast, ctx.device):
                loss_t = _loss(model, tokens, mixes[3])
            loss_t.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        figures += ", sync-free fwd+bwd ok"
    else:
        figures += ", sync check: CUDA only"
    return figures


# --- stage 2: document-causal attention ------------------------------------------------------


def stage_attention(ctx: Context, kind: str) -> str:
    """`kind` "flex" or "varlen": TorchTitan's wrapper with the mask its model builds, vs
    `F.scaled_dot_product_attention` with an explicit mask; outputs and q/k/v gradients."""
    from torchtitan.models.attention import (
        create_attention_mask,
        create_varlen_metadata_for_document,
        FlexAttentionWrapper,
        get_causal_mask_mod,
        get_document_mask_mod,
        VarlenAttentionWrapper,
    )
    from torch.nn.attention.flex_attention import and_masks

    ctx.need_cuda("flex attention has no CPU backward" if kind == "flex"
                  else "varlen attention is a CUDA kernel")
    batch, seq, heads, head_dim, eos = 2, 2048, 16, 64, 0
    gen = torch.Generator().manual_seed(0)
    tokens = packed_documents(batch, seq, eos, gen).to(ctx.device)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=gen)
               .to(ctx.device, torch.bfloat16).requires_grad_() for _ in range(3))
    grad_out = torch.randn(batch, heads, seq, head_dim, generator=gen).to(ctx.device, torch.bfloat16)
    if kind == "flex":
        mask = create_attention_mask(and_masks(get_causal_mask_mod(), get_document_mask_mod(tokens, eos)),
                                     batch, None, seq, seq)
        out = FlexAttentionWrapper()(q, k, v, block_mask=mask)
    else:
        meta = create_varlen_metadata_for_document(tokens, eos)
        packed = VarlenAttentionWrapper()(q, k, v, meta)  # (batch*seq, heads, head_dim)
        out = packed.view(batch, seq, heads, head_dim).transpose(1, 2)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(tokens, eos))
    ref = torch.autograd.grad(ref_out, (q, k, v), grad_out)
    diffs = [float((a.float() - b.float()).abs().max() / b.float().abs().max())
             for a, b in zip((out, *got), (ref_out, *ref))]
    docs = int((tokens == eos).sum())
    figures = (f"{docs} documents; max diff / max |ref|: out {diffs[0]:.1e} dq {diffs[1]:.1e} "
               f"dk {diffs[2]:.1e} dv {diffs[3]:.1e}")
    if max(diffs) > 2e-2:  # bf16 inputs and outputs; both sides accumulate in fp32
        raise AssertionError(f"{kind} differs from sdpa: {figures}")
    return figures


# --- stage 3: the trainer --------------------------------------------------------------------


def trainer_args(ctx: Context, dump: Path) -> list[str]:
    """debug_mot_3modality with validation; on CPU tiny and uncompiled."""
    common = ["--job.config_file", "train_configs/debug_mot_3modality.toml",
              "--job.dump_folder", str(dump), "--metrics.log_freq", "1",
              "--validation.enable", "--debug.seed", "0"]
    if ctx.smoke:
        return common + ["--training.steps", "3", "--validation.freq", "2",
                         "--validation.steps", "1", "--training.seq_len", "64",
                         "--validation.seq_len", "64", "--training.local_batch_size", "2",
                         "--validation.local_batch_size", "2", "--lr_scheduler.warmup_steps", "1",
                         "--training.mixed_precision_param", "bfloat16"]
    return common + ["--training.steps", "20", "--validation.freq", "10", "--compile.enable",
                     "--training.mixed_precision_param", "bfloat16"]


def stage_trainer(ctx: Context, ac: str, timeout: float) -> str:
    """`python -m torchtitan_mot.train` end to end; `ac` "none" or "selective" (op SAC)."""
    dump = ctx.out / f"trainer_{ac}"
    shutil.rmtree(dump, ignore_errors=True)
    args = trainer_args(ctx, dump)
    if ac == "selective":
        args += ["--activation_checkpoint.mode", "selective",
                 "--activation_checkpoint.selective_ac_option", "op"]
    run = run_trainer(args, timeout=timeout)
    dump.mkdir(parents=True, exist_ok=True)
    (dump / "stdout.log").write_text(run.log)
    # TorchTitan's own log lines say what was applied (a setting that did nothing fails here).
    applied = ["Mixed precision training is handled by AMP"]
    if ac == "selective":
        applied.append("Applied selective activation checkpointing")
    if not ctx.smoke:
        applied.append("Compiling each TransformerBlock with torch.compile")
    missing = [line for line in applied if line not in run.log]
    if missing:
        raise AssertionError(f"the trainer log lacks {missing}")
    losses = {step: loss for step, (loss, _) in run.steps().items()}
    vals = run.scalars("validation/loss")
    steps, freq = (3, 2) if ctx.smoke else (20, 10)
    if sorted(losses) != list(range(1, steps + 1)):
        raise AssertionError(f"logged steps {sorted(losses)}, expected 1..{steps}")
    if not all(math.isfinite(x) for x in losses.values()) or losses[steps] >= losses[1]:
        raise AssertionError(f"loss did not go down: {losses}")
    # TorchTitan validates at step 1 and every `freq` steps.
    expected = [s for s in range(1, steps + 1) if s == 1 or s % freq == 0]
    if sorted(vals) != expected or not all(math.isfinite(v) for v in vals.values()):
        raise AssertionError(f"validation at steps {vals}, expected {expected}")
    tps, mem = run.scalars("throughput(tps)"), run.scalars("memory/max_reserved(GiB)")
    return (f"loss {losses[1]:.3f}->{losses[steps]:.3f}, val {vals[expected[-1]]:.3f}"
            + (f", tps {tps[steps]:,.0f}" if steps in tps else "")
            + (f", mem {mem[steps]:.2f} GiB" if steps in mem else ""))


# --- stage 4: FSDP2 mixed precision and float8 -----------------------------------------------


def stage_fsdp(ctx: Context) -> str:
    """FSDP2 (TorchTitan's apply_fsdp) on a one-rank mesh, bf16 params + fp32 reduce, against
    the same weights unsharded under bf16 autocast: loss and full gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torchtitan.models.llama3.infra.parallelize import apply_fsdp, disable_fsdp_gradient_division

    args = tiny_3modality() if ctx.smoke else mot_args["debugmodel_3modality"]
    batch, seq = (2, 64) if ctx.smoke else (4, 2048)
    args = dataclasses.replace(args, vocab_size=2048, max_seq_len=seq)
    gen = torch.Generator().manual_seed(1)
    ids = five_mixes(batch, seq, args.n_modalities, gen)[0]
    tokens = torch.randint(0, args.vocab_size, (batch, seq), generator=gen).to(ctx.device)
    torch.manual_seed(0)
    reference = build_model(args, ctx.device, torch.float32)
    sharded = copy.deepcopy(reference)
    with autocast_if(True, ctx.device):
        ref_loss = _loss(reference, tokens, ids)
    ref_loss.backward()
    ref_grads = _grads(reference)

    backend = "nccl" if ctx.cuda else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh(ctx.device.type, (1,), mesh_dim_names=("fsdp",))
        apply_fsdp(sharded, mesh, param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                   pp_enabled=False)
        disable_fsdp_gradient_division(sharded)
        loss = _loss(sharded, tokens, ids)
        loss.backward()
        grads = _grads(sharded)
    finally:
        dist.destroy_process_group()
    loss_diff = abs(float(loss) - float(ref_loss)) / float(ref_loss)
    cosine = float(F.cosine_similarity(grads, ref_grads, dim=0))
    figures = (f"{backend}: loss {float(loss):.4f} vs autocast {float(ref_loss):.4f} "
               f"(rel {loss_diff:.1e}), grad cosine {cosine:.5f}")
    # bf16 params round the weights themselves, autocast only the matmul inputs.
    if loss_diff > 1e-2 or cosine < 0.99:
        raise AssertionError(f"FSDP2 bf16 differs from autocast: {figures}")
    return figures


def stage_float8(ctx: Context) -> str:
    """TorchTitan's float8 converter on a 1B-class MoT: the converted model trains three
    compiled steps with finite losses close to bf16 autocast, and the converted Linears
    actually run (MoT reads plain per-modality weights through `mot::routed_mm`, so a
    converted module whose forward is never called would be float8 in name only).
    CPU smoke: torchao's emulated float8 numerics, eager, tiny shape."""
    if ctx.cuda and torch.cuda.get_device_capability(ctx.device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(ctx.device)
        pytest.skip(f"float8 needs SM89+, this GPU is SM{major}{minor}")
    if not ctx.cuda and not ctx.smoke:
        pytest.skip("needs CUDA (float8 GEMMs)")
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is not installed")
    from torchtitan.config import JobConfig
    from torchtitan.config.job_config import Compile as CompileConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.models.llama3.infra.parallelize import apply_compile
    from torchtitan.protocols.model_converter import build_model_converters

    # The converter reads only these two settings: no TOML, tokenizer or data involved.
    job_config = JobConfig()
    job_config.model.converters = ["quantize.linear.float8"]
    job_config.quantize.linear.float8.emulate = ctx.smoke
    parallel_dims = ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1,
                                 world_size=1)
    if ctx.smoke:
        args, batch, seq = tiny_3modality(), 2, 64
    else:
        args = dataclasses.replace(mot_args["debugmodel_3modality"], dim=2048, n_layers=16,
                                   n_heads=32, n_kv_heads=8)
        batch, seq = 1, 4096
    args = dataclasses.replace(args, vocab_size=2048 if ctx.smoke else 32768, max_seq_len=seq)
    gen = torch.Generator().manual_seed(0)
    ids = five_mixes(batch, seq, args.n_modalities, gen)[0]
    tokens = torch.randint(0, args.vocab_size, (batch, seq), generator=gen).to(ctx.device)
    losses: dict[str, list[float]] = {}
    calls = 0
    for name in ("bf16", "float8"):
        torch.manual_seed(0)
        model = build_model(args, ctx.device, torch.float32)
        if name == "float8":
            build_model_converters(job_config, parallel_dims).convert(model)
            # The per-modality projections (the output head is a plain Linear, converted too).
            converted = [m for fqn, m in model.named_modules()
                         if fqn.startswith("layers.") and type(m).__name__ == "Float8Linear"]
            if not converted:
                raise AssertionError("the float8 converter converted no per-modality Linear")

            def count(*_: object) -> None:
                nonlocal calls
                calls += 1

            for m in converted:
                m.register_forward_hook(count)
        if not ctx.smoke:  # emulated float8 runs eager only
            apply_compile(model, CompileConfig(enable=True, components=["model"]))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        losses[name] = []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            with autocast_if(True, ctx.device):
                loss = _loss(model, tokens, ids)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
        del model, opt
        if ctx.cuda:
            torch.cuda.empty_cache()
    rel = abs(losses["float8"][0] - losses["bf16"][0]) / losses["bf16"][0]
    figures = (f"losses bf16 {losses['bf16'][-1]:.3f} float8 {losses['float8'][-1]:.3f} "
               f"(step-1 rel diff {rel:.1e}), per-modality float8 Linear forwards {calls}")
    if not all(math.isfinite(x) for x in losses["float8"]) or rel > 5e-2:
        raise AssertionError(f"float8 run is off: {figures}")
    if calls == 0:
        raise AssertionError(f"float8 Linears were converted but none ran: {figures}")
    return figures


# --- stage 5: the per-modality matmul --------------------------------------------------------


MIXES = {"1.0": [1.0], "0.5-0.5": [0.5, 0.5], "0.7-0.28-0.02": [0.7, 0.28, 0.02]}


def block_projections(args: MoTModelArgs) -> list[tuple[int, int]]:
    """(in, out) of one block's seven projections: wq wk wv wo w1 w2 w3."""
    from torchtitan_mot.model.feedforward import ffn_hidden_dim

    dim, kv = args.dim, (args.n_kv_heads or args.n_heads) * (args.dim // args.n_heads)
    hidden = ffn_hidden_dim(dim, args.multiple_of, args.ffn_dim_multiplier)
    return [(dim, dim), (dim, kv), (dim, kv), (dim, dim), (dim, hidden), (hidden, dim), (dim, hidden)]


def stage_microbench(ctx: Context) -> str:
    """Per mix, one 8B block's projections (fwd+bwd) summed: routed_mm and grouped_mm as
    multiples of F.linear; routed_mm and grouped_mm must compute the same product."""
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (128, 64), (64, 128)] \
        if ctx.smoke else block_projections(EIGHT_B)
    tokens = 256 if ctx.smoke else 8192
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    iters, warmup = (2, 1) if ctx.smoke else (10, 3)
    _check_grouped_matches_routed(ctx, shapes[4], tokens, dtype)
    parts = []
    for label, fractions in MIXES.items():
        total = {"linear": 0.0, "routed_mm": 0.0, "grouped_mm": 0.0}
        for in_f, out_f in shapes:
            for name, ms in matmul_microbench(in_f, out_f, tokens, fractions, ctx.device, dtype,
                                              iters, warmup).items():
                total[name] += ms
        parts.append(f"{label}: linear {total['linear']:.2f} ms, routed x"
                     f"{total['routed_mm'] / total['linear']:.2f}, grouped x"
                     f"{total['grouped_mm'] / total['linear']:.2f}")
    return "; ".join(parts)


def _check_grouped_matches_routed(ctx: Context, shape: tuple[int, int], tokens: int,
                                  dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    counts = [tokens * 7 // 10, tokens * 28 // 100]
    counts.append(tokens - sum(counts))
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    x = torch.randn(tokens, shape[0], generator=gen).to(ctx.device, dtype)
    ws = [torch.randn(shape[1], shape[0], generator=gen).to(ctx.device, dtype) for _ in counts]
    a = routed_mm(x, ws, offsets).float()
    b = torch._grouped_mm(x, torch.stack(ws).transpose(-2, -1), offs=offsets.to(ctx.device)).float()
    err = float((a - b).abs().max() / a.abs().max())
    if err > 1e-2:
        raise AssertionError(f"torch._grouped_mm and mot::routed_mm differ (rel {err:.1e})")


# --- stage 6: end-to-end benchmark -----------------------------------------------------------


def stage_benchmark(ctx: Context, timeout: float) -> str:
    """`python -m torchtitan_mot.benchmark` for MoT with 2 and 3 modalities (each run also
    trains the dense twin and TorchTitan's Llama3 of the same shape, alternating); its
    figures read from the JSON it writes."""
    if ctx.smoke:
        shape = ["--dim", "64", "--n-layers", "2", "--n-heads", "4", "--seq-len", "64",
                 "--batch", "2", "--vocab", "64", "--steps", "2", "--warmup", "1",
                 "--device", "cpu"]
    else:
        shape = ["--dim", "2048", "--n-layers", "16", "--n-heads", "32", "--n-kv-heads", "8",
                 "--seq-len", "4096", "--batch", "1", "--vocab", "32768", "--compile",
                 "--dtype", "bf16", "--steps", "10", "--warmup", "3", "--device", str(ctx.device)]
    deadline = time.monotonic() + timeout
    parts = []
    for n_mod in (3,) if ctx.smoke else (2, 3):
        result = ctx.out / f"benchmark_{n_mod}.json"
        subprocess.run([sys.executable, "-m", "torchtitan_mot.benchmark", *shape,
                        "--n-modalities", str(n_mod), "--json", str(result)],
                       cwd=REPO, env=trainer_env(), check=True, capture_output=True,
                       timeout=max(1.0, deadline - time.monotonic()))
        bench = json.loads(result.read_text())
        models = bench["models"]

        def mfu(m: dict) -> str:
            return "-" if m["mfu_percent"] is None else f"{m['mfu_percent']:.1f}"

        parts.append(f"mot({n_mod})/llama3 {bench['step_time_ratio']['llama3']:.3f}: " + ", ".join(
            f"{name} {m['median_ms']:.1f} ms {m['tokens_per_s']:.0f} tok/s {m['total_mib']:.1f} MiB "
            f"MFU {mfu(m)}%" for name, m in models.items()))
    return "; ".join(parts)


# --- stage 7: MoE expert kernels and the Transfusion mask, against their reference paths -----


Forward = Callable[[torch.nn.Module], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]
"""One forward of a model: (loss, outputs to compare)."""


@dataclasses.dataclass
class Run:
    """One forward+backward: its loss, outputs and every parameter's gradient (fp32)."""

    loss: float
    outputs: list[torch.Tensor]
    grads: dict[str, torch.Tensor]


@dataclasses.dataclass
class TwinDiff:
    """How far one run is from another: the loss (relative), the outputs (max diff / max
    |reference|), all gradients together (norm relative), each parameter's gradient error
    (norm), and how many parameters have a zero gradient in exactly one of the two (an
    expert no token reached has an exact zero on both paths)."""

    loss: float
    out: float
    grad: float
    param_errors: dict[str, float]
    zero_grads: int

    @classmethod
    def of(cls, got: Run, ref: Run) -> TwinDiff:
        out = max(float((a - b).abs().max() / b.abs().max())
                  for a, b in zip(got.outputs, ref.outputs))
        errors = {n: float((got.grads[n] - g).norm()) for n, g in ref.grads.items()}
        ref_norm = float(torch.stack([g.norm() for g in ref.grads.values()]).norm())
        zero_grads = sum(bool(g.count_nonzero()) != bool(got.grads[n].count_nonzero())
                         for n, g in ref.grads.items())
        return cls(abs(got.loss - ref.loss) / abs(ref.loss), out,
                   math.sqrt(sum(e * e for e in errors.values())) / ref_norm, errors, zero_grads)

    def ratios(self, bf16: TwinDiff, loss_scale: float) -> dict[str, float]:
        """This difference over the bf16 error `bf16` of the same input: the loss (over
        `loss_scale`, the worst bf16 loss error of all inputs: one scalar's error can be
        near zero by chance), the outputs, and the worst parameter (each gradient against
        its own bf16 error, so an expert that one token reached is judged by that token)."""

        def ratio(a: float, b: float) -> float:
            return a / b if b else (0.0 if a == 0 else math.inf)

        return {"loss": ratio(self.loss, loss_scale), "out": ratio(self.out, bf16.out),
                "grad": max(ratio(e, bf16.param_errors[n]) for n, e in self.param_errors.items())}


def _forward_backward(model: torch.nn.Module, forward: Forward, autocast: bool,
                      device: torch.device) -> Run:
    model.zero_grad(set_to_none=True)
    with autocast_if(autocast, device):
        loss, outputs = forward(model)
    loss.backward()
    # A parameter no token reached has no gradient: it is a zero one.
    grads = {n: torch.zeros(p.shape, device=p.device) if p.grad is None else p.grad.float()
             for n, p in model.named_parameters()}
    return Run(loss.item(), [o.detach().float() for o in outputs], grads)


def compare_twins(reference: torch.nn.Module, test: torch.nn.Module, forwards: list[Forward],
                  device: torch.device) -> list[tuple[TwinDiff, TwinDiff]]:
    """Two models with the same weights, each forward under bf16 autocast; per forward
    (test vs reference, reference vs itself in fp32). The second is the bf16 error the first
    is judged by: both twins round in bf16, only the code under test differs."""
    if reference.state_dict().keys() != test.state_dict().keys() or not all(
            torch.equal(a, b) for a, b in zip(reference.state_dict().values(),
                                              test.state_dict().values())):
        raise AssertionError("the twins do not hold the same weights")
    diffs = []
    for forward in forwards:
        fp32 = _forward_backward(reference, forward, False, device)
        ref = _forward_backward(reference, forward, True, device)
        got = _forward_backward(test, forward, True, device)
        diffs.append((TwinDiff.of(got, ref), TwinDiff.of(ref, fp32)))
    return diffs


def check_twins(what: str, diffs: list[tuple[TwinDiff, TwinDiff]], extra: str = "") -> str:
    """Figures (worst over the inputs); fail when, on some input, the loss, the outputs or a
    parameter's gradient differ by more than 3x the reference's own bf16 error (the ratios
    of TwinDiff.ratios), or a gradient is zero on one side only. Judged input by input: a
    routing flip in one mix must not loosen the bound of the others."""

    def worst(i: int) -> str:
        return ", ".join(f"{k} {max(getattr(d[i], k) for d in diffs):.1e}"
                         for k in ("loss", "out", "grad"))

    loss_scale = max(b.loss for _, b in diffs)
    ratios = [m.ratios(b, loss_scale) for m, b in diffs]
    worst_ratio = {k: max(r[k] for r in ratios) for k in ratios[0]}
    zero_grads = sum(m.zero_grads for m, _ in diffs)
    figures = (f"{extra}{what}: {worst(0)}; bf16 vs fp32 reference: {worst(1)}; worst ratio "
               + ", ".join(f"{k} {r:.2f}" for k, r in worst_ratio.items())
               + f"; zero-gradient mismatches {zero_grads}")
    over = [k for k, r in worst_ratio.items() if r > 3]
    if over or zero_grads:
        raise AssertionError(f"beyond 3x the bf16 error in {over or 'zero gradients'}: {figures}")
    return figures


def moe_twins(device: torch.device, batch: int, seq: int, grouped: bool = True
              ) -> tuple[list[tuple[TwinDiff, TwinDiff]], str]:
    """`debugmodel_hybrid` (MoT, the text FFN a TorchTitan MoE) built twice with the same
    weights, the experts on TorchTitan's for-loop path and on `torch._grouped_mm` (`grouped`;
    False compares the for-loop path with itself), over five modality mixes in which the MoE
    modality (0) is absent once and holds ONE token once, so empty groups reach the kernel."""
    from torchtitan.models.moe import MoE

    base = dataclasses.replace(mot_args["debugmodel_hybrid"], vocab_size=2048, max_seq_len=seq)
    # update_from_config would pick the path for the machine; each twin fixes its own.
    models = []
    for use_grouped_mm in (False, grouped):
        args = dataclasses.replace(
            base, moe_args=dataclasses.replace(base.moe_args, use_grouped_mm=use_grouped_mm))
        torch.manual_seed(0)
        models.append(build_model(args, device, torch.float32))
        paths = {m.experts.use_grouped_mm for m in models[-1].modules() if isinstance(m, MoE)}
        if paths != {use_grouped_mm}:
            raise AssertionError(f"use_grouped_mm={use_grouped_mm} built experts with {paths}")
    models[1].load_state_dict(models[0].state_dict())
    gen = torch.Generator().manual_seed(0)
    n_mod = base.n_modalities
    # five_mixes thins out the LAST modality; reversed ids thin out modality 0, the MoE one.
    mixes = [n_mod - 1 - ids for ids in five_mixes(batch, seq, n_mod, gen)]
    tokens = torch.randint(0, base.vocab_size, (batch, seq), generator=gen).to(device)

    def forward(ids: torch.Tensor) -> Forward:
        def run(model: torch.nn.Module) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            logits = model(tokens, modality_ids=HostTensor(ids))
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.roll(-1, 1).flatten())
            return loss, (logits,)
        return run

    diffs = compare_twins(models[0], models[1], [forward(ids) for ids in mixes], device)
    return diffs, f"MoE tokens per mix {[int((ids == 0).sum()) for ids in mixes]}; "


def stage_moe_grouped_mm(ctx: Context) -> str:
    """MoT + MoE: TorchTitan's grouped_mm experts vs its for-loop experts (moe_twins)."""
    ctx.need_cuda("TorchTitan's grouped_mm expert path needs Hopper, SM90+")
    if not grouped_mm_available():
        major, minor = torch.cuda.get_device_capability(ctx.device)
        pytest.skip(f"TorchTitan's grouped_mm expert path needs Hopper (SM90+), "
                    f"this GPU is SM{major}{minor}")
    return check_twins("grouped_mm vs for-loop", *moe_twins(ctx.device, 4, 2048))


LONG_RUNS = dict(text_len=(16, 300), image_len=(64, 400))
"""Text runs and images of up to a few flex blocks (128 positions) each."""
NO_EOS = SimpleNamespace(eos_id=2047)
"""A tokenizer whose EOS the Transfusion batch never holds: one document per row (the sdpa
path's explicit mask has no document part)."""


def transfusion_twins(device: torch.device, batch: int, seq: int,
                      test_flavor: str = "debugmodel_transfusion_flex"
                      ) -> tuple[list[tuple[TwinDiff, TwinDiff]], str]:
    """`test_flavor` (flex attention, TorchTitan's FlexAttentionWrapper with the block mask
    of (causal OR same image) AND same document) vs `debugmodel_transfusion` (sdpa with the
    explicit causal-OR-same-image mask), same weights, on two Transfusion batches whose text
    runs and images span several of flex's 128-position blocks; the loss is the text cross-entropy
    plus the latent positions' noise MSE, the outputs logits and eps."""
    patch_dim = 16
    shape = dict(vocab_size=2048, max_seq_len=seq, diffusion_modality=1, patch_dim=patch_dim)
    models = []
    for flavor in ("debugmodel_transfusion", test_flavor):
        torch.manual_seed(0)
        models.append(build_model(dataclasses.replace(mot_args[flavor], **shape), device,
                                  torch.float32))
    models[1].load_state_dict(models[0].state_dict())
    images = latents = 0

    def forward(seed: int) -> Forward:
        nonlocal images, latents
        data, labels = transfusion_batch(batch, seq, patch_dim, seed=seed, text_ids=1900,
                                         boi=2000, eoi=2001,
                                         **LONG_RUNS if seq >= 1024 else {})
        if (data["input"] == NO_EOS.eos_id).any():
            raise AssertionError("the batch holds the EOS id meant to be absent")
        # Modality ids stay in host memory (HostTensor), as the trainer passes them.
        ids = HostTensor(data.pop("modality_ids"))
        data = {k: v.to(device) for k, v in data.items()}
        labels = labels.to(device)
        extra = {k: data[k] for k in ("patches", "timesteps", "image_ids")}
        latent = (data["image_ids"] >= 0).unsqueeze(-1)
        images += int(data["image_ids"].max(dim=1).values.add(1).sum())
        latents += int(latent.sum())
        # Built once per batch, outside autocast, as the trainer builds it.
        flex = models[1].model_args.attn_type == "flex"
        block_mask = models[1].get_attention_masks(data["input"], NO_EOS, extra) if flex else None

        def run(model: torch.nn.Module) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            masks = block_mask if model is models[1] else None  # sdpa builds its own
            logits, eps = model(data["input"], ids, attention_masks=masks, **extra)
            text = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            image = ((eps.float() - data["noise"]) ** 2 * latent).sum() / latent.sum() / patch_dim
            return text + image, (logits, eps)
        return run

    diffs = compare_twins(models[0], models[1], [forward(seed) for seed in (0, 1)], device)
    return diffs, f"2 batches, {images} images, {latents} latent positions; "


def stage_transfusion_flex(ctx: Context) -> str:
    """Transfusion with flex attention vs sdpa (transfusion_twins)."""
    ctx.need_cuda("flex attention has no CPU backward")
    return check_twins("flex vs sdpa", *transfusion_twins(ctx.device, 4, 2048))


# --- multi-GPU: each parallelism's 10 logged losses against a one-GPU run ---------------------


MULTI_STEPS = 10
MULTI_BASE = ["--training.steps", str(MULTI_STEPS), "--metrics.log_freq", "1", "--debug.seed", "0",
              "--debug.deterministic", "--training.mixed_precision_param", "float32",
              "--lr_scheduler.warmup_steps", "2", "--training.local_batch_size", "4",
              "--training.seq_len", "512"]
_references: dict[str, dict[int, float]] = {}


def _train(ctx: Context, config: str, name: str, nproc: int, extra: list[str], timeout: float,
           log_rank: int = 0) -> dict[int, float]:
    dump = ctx.out / f"multi_{name}"
    shutil.rmtree(dump, ignore_errors=True)
    run = run_trainer(["--job.config_file", f"train_configs/{config}", "--job.dump_folder", str(dump),
                       *MULTI_BASE, *extra], nproc, log_rank, timeout=timeout)
    losses = {step: loss for step, (loss, _) in run.steps().items()}
    if sorted(losses) != list(range(1, MULTI_STEPS + 1)):
        raise AssertionError(f"{name}: logged steps {sorted(losses)}")
    return losses


def compare_with_one_gpu(ctx: Context, config: str, name: str, nproc: int, extra: list[str],
                         timeout: float, log_rank: int = 0) -> str:
    n_gpu = torch.cuda.device_count()
    if n_gpu < nproc:
        pytest.skip(f"needs {nproc} GPUs, found {n_gpu}")
    deadline = time.monotonic() + timeout
    if config not in _references:
        _references[config] = _train(ctx, config, f"ref_{config}", 1, [], timeout)
    got = _train(ctx, config, name, nproc, extra, deadline - time.monotonic(), log_rank)
    ref = _references[config]
    diff = max(abs(got[s] - ref[s]) for s in ref)
    figures = f"{nproc} GPUs, max |loss - 1 GPU| over {MULTI_STEPS} steps {diff:.1e}"
    if diff > 1e-3:  # fp32; only reduction order differs
        raise AssertionError(figures)
    return figures


def hsdp_shard() -> int:
    """HSDP 2 x shard: 2x4 on 8 GPUs, 2x2 on 4."""
    return max(2, torch.cuda.device_count() // 2 if torch.cuda.is_available() else 2)


def cuda_feature_sets(timeout: float) -> str:
    """TorchTitan's feature sets that CPU CI cannot run (flex/varlen attention, context
    parallel), through `harness.feature_matrix` with the GPUs present."""
    n_gpu = torch.cuda.device_count()
    sets = [fs for fs in FEATURE_SETS if fs.needs_cuda and fs.ngpu <= n_gpu]
    if not sets:
        pytest.skip(f"every CUDA-only feature set needs more than {n_gpu} GPUs")
    matrix = FeatureMatrix(REPO, Path(tempfile.mkdtemp(prefix="feature_matrix_cuda_")))
    deadline = time.monotonic() + timeout
    outcomes = []
    for fs in sets:
        matrix.timeout = max(1, int(deadline - time.monotonic()))
        outcomes.append(matrix.run(fs))
    failed = [f"{o.name}: {o.detail}" for o in outcomes if o.status != "passed"]
    if failed:
        raise AssertionError("; ".join(failed))
    return summary_line(outcomes)


# --- the stages as tests (figures go to the runner's table) ----------------------------------


Figures = Callable[[str], None]


@pytest.fixture
def figures(record_property: Callable[[str, object], None]) -> Figures:
    """Record a stage's figures (the runner prints them in its table)."""
    return lambda text: record_property("figures", text)


@pytest.mark.parametrize("mode", [pytest.param("bf16", marks=stage("1a model bf16", 45)),
                                  pytest.param("autocast", marks=stage("1b model autocast", 45))])
def test_model(ctx: Context, mode: str, figures: Figures) -> None:
    figures(stage_model(ctx, mode))


@pytest.mark.parametrize("kind", [pytest.param("flex", marks=stage("2a flex document-causal", 35)),
                                  pytest.param("varlen", marks=stage("2b varlen document-causal", 25))])
def test_attention(ctx: Context, kind: str, figures: Figures) -> None:
    figures(stage_attention(ctx, kind))


@pytest.mark.parametrize("ac", [pytest.param("none", marks=stage("3a trainer compile+val", 55)),
                                pytest.param("selective", marks=stage("3b trainer + op SAC", 55))])
def test_trainer(ctx: Context, ac: str, stage_timeout: float, figures: Figures) -> None:
    figures(stage_trainer(ctx, ac, stage_timeout))


@pytest.mark.parametrize("case", [pytest.param("fsdp", marks=stage("4a FSDP2 bf16/fp32-reduce", 20)),
                                  pytest.param("float8", marks=stage("4b float8 1B-class", 40))])
def test_precision(ctx: Context, case: str, figures: Figures) -> None:
    figures(stage_fsdp(ctx) if case == "fsdp" else stage_float8(ctx))


@pytest.mark.gpu(stage="5 routed_mm microbench", timeout=20)
def test_microbench(ctx: Context, figures: Figures) -> None:
    figures(stage_microbench(ctx))


@pytest.mark.gpu(stage="6 benchmark 1B-class", timeout=140)
def test_benchmark(ctx: Context, stage_timeout: float, figures: Figures) -> None:
    figures(stage_benchmark(ctx, stage_timeout))


@pytest.mark.parametrize("case", [
    pytest.param("moe", marks=stage("7a MoE grouped_mm", 30)),
    pytest.param("flex", marks=stage("7b Transfusion flex mask", 60)),
])
def test_twins(ctx: Context, case: str, figures: Figures) -> None:
    figures(stage_moe_grouped_mm(ctx) if case == "moe" else stage_transfusion_flex(ctx))


TP2 = ["--parallelism.tensor_parallel_degree", "2"]
CP2 = ["--parallelism.context_parallel_degree", "2"]
PP2 = ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_microbatch_size", "1"]


@pytest.mark.parametrize("config, name, extra, log_rank", [
    pytest.param("debug_mot.toml", "tp2", TP2, 0, marks=stage("M1 TP=2 + SP", 100, multi_gpu=True)),
    pytest.param("debug_mot.toml", "cp2_sdpa", CP2, 0, marks=stage("M2 CP=2 ring sdpa", 60, multi_gpu=True)),
    pytest.param("debug_mot_flex.toml", "cp2_flex", CP2, 0,
                 marks=stage("M3 CP=2 ring flex", 120, multi_gpu=True)),
    pytest.param("debug_mot.toml", "pp2", PP2, 1, marks=stage("M4 PP=2", 60, multi_gpu=True)),
])
def test_two_gpus_match_one(ctx: Context, config: str, name: str, extra: list[str], log_rank: int,
                            stage_timeout: float, figures: Figures) -> None:
    figures(compare_with_one_gpu(ctx, config, name, 2, extra, stage_timeout, log_rank))


@pytest.mark.multi_gpu
@pytest.mark.gpu(stage=f"M5 HSDP 2x{hsdp_shard()} NCCL", timeout=60)
def test_hsdp_matches_one_gpu(ctx: Context, stage_timeout: float, figures: Figures) -> None:
    shard = hsdp_shard()
    data = repeated_dataset(REPO / "assets/demo/text_image", ctx.out / "data_hsdp", 2 * shard)
    figures(compare_with_one_gpu(ctx, "debug_mot.toml", "hsdp", 2 * shard,
                                 ["--parallelism.data_parallel_replicate_degree", "2",
                                  "--parallelism.data_parallel_shard_degree", str(shard),
                                  "--training.dataset_path", str(data)], stage_timeout))


@pytest.mark.multi_gpu
@pytest.mark.gpu(stage="M6 feature matrix: CUDA-only sets", timeout=300)
def test_cuda_feature_sets(ctx: Context, stage_timeout: float, figures: Figures) -> None:
    figures(cuda_feature_sets(stage_timeout))
