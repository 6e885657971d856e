"""Training step time of an MoT model against its dense twin and TorchTitan's Llama3, in one process.

The dense twin (`n_modalities=1`) has the same dims and sees the same tokens, so the ratio
of step times is the whole cost of modality routing. TorchTitan's own Llama3 `Transformer`
of the same shape is the third model: the baseline users compare against, and the check
that the dense twin itself costs nothing over it. The three models train (forward, backward,
AdamW step) ALTERNATELY, rotating which goes first every step, so drifts of a shared machine
(thermal, other tenants, allocator state) hit all alike; medians and the p10-p90 spread are
reported over the measured steps. On CUDA the default dtype is bf16 and MFU is reported
against TorchTitan's peak-FLOPs table, with TorchTitan's FLOP count (active FLOPs for MoT).

Modality mixes are synthetic: `--mix` fractions, perturbed per step by `--mix-jitter` so the
proportions change from batch to batch (this is what would recompile a model with
data-dependent shapes). Tokens of a modality sit in contiguous runs (`--placement segments`,
like interleaved text/image/speech data) or are scattered token by token (`random`).

Memory is measured, not estimated, and split in two parts that are comparable on any device:
  * state: bytes of this model's parameters and AdamW state (exact, from the tensors);
  * in-step peak: the most memory the step allocates above its starting point (gradients,
    activations, temporaries). On CUDA this is `max_memory_allocated() - memory_allocated()`
    over the step; on CPU (no allocator statistics) it is the peak of live tensor bytes
    tracked by torch's MemTracker during one extra, untimed step per model.

Page faults per step are printed too: with glibc's default settings a CPU step re-faults
its activations from the OS and the two models can differ by 10% for that reason alone, so
by default the benchmark keeps freed memory resident (`--host-malloc`).

`--transfusion` benchmarks the Transfusion setting instead: an MoT with diffusion layers
against its dense twin (no Llama3: it has no patch layers), both trained on the same
batches whose images are BOI, the latent's patch positions and EOI; each image's patches
are noised by `DiffusionSchedule.add_noise` at its own t, and the loss is CE on the text
(none at BOI and latent positions) plus the weighted per-image eps-MSE (`per_image_mse`).

The command line is `python -m torchtitan_mot.benchmark`; `run` returns every figure as a
JSON-able dict (what `--json FILE` writes).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.distributed._tools.mem_tracker import MemTracker
from torchtitan.config.job_config import Compile as CompileConfig
from torchtitan.models.llama3.infra.parallelize import apply_compile
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.tools.utils import get_peak_flops

from torchtitan_mot import mot_args
from torchtitan_mot.model import MoTModelArgs
from torchtitan_mot.model.schedule import DiffusionSchedule
from torchtitan_mot.trainer.loss import per_image_mse
from torchtitan_mot.benchmark.perf import build_model, CompileCounts, split_counts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_TOTAL = "Total"  # MemTracker's key for the sum over tensor categories


def keep_freed_memory_resident() -> bool:
    """Stop glibc from handing freed activation memory back to the OS between steps.

    By default glibc serves big blocks with fresh `mmap`s and trims the top of its heap once
    enough of it is free, so every training step page-faults its activations back in. On
    the 2-core CI box that is tens of thousands of minor faults per step, and it varies with
    the exact allocation sequence, so two models doing the same work can differ by ~10%.
    With mmap for blocks and trimming both off, the memory of step N is reused by step N+1
    (RSS stays at the peak, which a training step reaches every step anyway).
    Returns False (and changes nothing) where the C library is not glibc. It is not airtight
    on every host: the faults/step column shows what is left.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))


def llama3_args(args: MoTModelArgs) -> TransformerModelArgs:
    """TorchTitan's Llama3 arguments of the same shape (MoT's extra fields dropped)."""
    names = {f.name for f in dataclasses.fields(TransformerModelArgs)}
    return TransformerModelArgs(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name in names}
    )


def build_args(a: argparse.Namespace) -> MoTModelArgs:
    """The flavor with any explicit dims and the benchmark's vocab / sequence length."""
    overrides = {
        field: value
        for field, value in (
            ("dim", a.dim), ("n_layers", a.n_layers), ("n_heads", a.n_heads),
            ("n_kv_heads", a.n_kv_heads), ("n_modalities", a.n_modalities),
        )
        if value is not None
    }
    if a.transfusion:
        channels, _, _ = latent_shape(a)
        overrides.update(diffusion=True, diffusion_modality=1, patch_dim=channels * a.patch_size**2)
    args = dataclasses.replace(
        mot_args[a.flavor], vocab_size=a.vocab, max_seq_len=a.seq_len, **overrides
    )
    if a.transfusion and args.n_modalities != 2:
        raise SystemExit("--transfusion benchmarks text + one latent image modality: n_modalities must be 2")
    if args.n_modalities < 2:
        raise SystemExit("the MoT side needs n_modalities >= 2 (the dense twin is built for you)")
    return args


def base_mix(spec: str | None, n_modalities: int) -> torch.Tensor:
    if spec is None:
        return torch.full((n_modalities,), 1.0 / n_modalities)
    mix = torch.tensor([float(f) for f in spec.split(",")])
    if mix.numel() != n_modalities or bool((mix < 0).any()) or mix.sum() <= 0:
        raise SystemExit(f"--mix needs {n_modalities} non-negative fractions, got {spec}")
    return mix / mix.sum()


def modality_row(counts: list[int], placement: str, segment_len: int,
                 gen: torch.Generator) -> torch.Tensor:
    """One sequence's modality ids with exactly `counts[m]` tokens of modality m."""
    if placement == "random":
        ids = torch.cat([torch.full((c,), m) for m, c in enumerate(counts)])
        return ids[torch.randperm(ids.numel(), generator=gen)]
    runs = []
    for m, c in enumerate(counts):
        n_runs = max(1, round(c / segment_len)) if c else 0
        if n_runs == 0:
            continue
        cuts = torch.randperm(c - 1, generator=gen)[: n_runs - 1] + 1 if c > 1 else torch.empty(0)
        bounds = [0, *sorted(cuts.tolist()), c]
        runs += [torch.full((e - s,), m) for s, e in zip(bounds, bounds[1:]) if e > s]
    return torch.cat([runs[i] for i in torch.randperm(len(runs), generator=gen).tolist()])


def latent_shape(a: argparse.Namespace) -> tuple[int, int, int]:
    """(C, H, W) of `--latent-shape`, checked against `--patch-size`."""
    shape = tuple(int(v) for v in a.latent_shape.split(","))
    if len(shape) != 3 or min(shape) < 1 or shape[1] % a.patch_size or shape[2] % a.patch_size:
        raise SystemExit(f"--latent-shape C,H,W with H and W divisible by --patch-size "
                         f"{a.patch_size}, got {a.latent_shape}")
    return shape  # type: ignore[return-value]


def jittered_mix(a: argparse.Namespace, mix: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    jitter = (torch.rand(mix.shape, generator=gen) * 2 - 1) * a.mix_jitter
    fractions = (mix + jitter).clamp(min=0)
    return fractions / fractions.sum() if fractions.sum() > 0 else mix


def make_transfusion_batch(a: argparse.Namespace, mix: torch.Tensor, gen: torch.Generator,
                           schedule: DiffusionSchedule) -> tuple:
    """A Transfusion batch: every row holds the same number of images (the image fraction of
    the jittered mix), each BOI, N = (H/p)(W/p) latent positions, EOI, at random places
    between text runs. Returns tokens, labels, modality_ids, the diffusion inputs (x_t
    patches, timesteps, image_ids, the eps target) and the realised fractions."""
    channels, height, width = latent_shape(a)
    n_patches = (height // a.patch_size) * (width // a.patch_size)
    block = n_patches + 2
    n_images = min(round(float(jittered_mix(a, mix, gen)[1]) * a.seq_len / block),
                   (a.seq_len - 1) // block)
    if n_images < 1:
        raise SystemExit(f"--seq-len {a.seq_len} holds no image of {block} positions "
                         f"(BOI, {n_patches} patches, EOI)")
    boi, eoi = a.vocab - 2, a.vocab - 1
    tokens = torch.randint(0, a.vocab - 2, (a.batch, a.seq_len + 1), generator=gen)
    ids = torch.zeros(a.batch, a.seq_len + 1, dtype=torch.long)
    image_ids = torch.full((a.batch, a.seq_len + 1), -1)
    n_text = a.seq_len + 1 - n_images * block
    for row in range(a.batch):
        # image k starts after cuts[k] text tokens (sorted, with repeats: adjacent images)
        cuts = torch.randint(0, n_text + 1, (n_images,), generator=gen).sort().values.tolist()
        for k, cut in enumerate(cuts):
            start = cut + k * block
            tokens[row, start : start + block - 1] = boi  # BOI, then latent placeholders
            tokens[row, start + block - 1] = eoi
            ids[row, start : start + block] = 1
            image_ids[row, start + 1 : start + block - 1] = k
    tokens, ids, image_ids = tokens[:, :-1], ids[:, :-1], image_ids[:, :-1]
    labels = torch.cat([tokens[:, 1:], torch.full((a.batch, 1), eoi)], dim=1)
    labels = torch.where(tokens == boi, -100, labels)
    latent = (image_ids >= 0).unsqueeze(-1)
    patch_dim = channels * a.patch_size**2
    x0 = torch.randn(a.batch, a.seq_len, patch_dim, generator=gen) * latent
    noise = torch.randn(a.batch, a.seq_len, patch_dim, generator=gen) * latent
    t = torch.where(image_ids >= 0, torch.randint(0, schedule.timesteps, (a.batch, a.seq_len),
                                                  generator=gen), 0)
    diffusion = {"patches": schedule.add_noise(x0, noise, t), "timesteps": t,
                 "image_ids": image_ids, "noise": noise}
    dev = a.device
    image_fraction = float(ids[0].float().mean())
    return (tokens.to(dev), labels.to(dev), ids.to(dev),
            {k: v.to(dev) for k, v in diffusion.items()},
            [round(1 - image_fraction, 6), round(image_fraction, 6)])


def make_batch(a: argparse.Namespace, mix: torch.Tensor, gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict, list[float]]:
    """tokens, labels, modality_ids (all (batch, seq)), no diffusion inputs, and the step's
    realised fractions."""
    fractions = jittered_mix(a, mix, gen)
    counts = split_counts(fractions, a.seq_len)
    ids = torch.stack([modality_row(counts, a.placement, a.segment_len, gen)
                       for _ in range(a.batch)])
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq_len + 1), generator=gen)
    dev = a.device
    return (tokens[:, :-1].to(dev), tokens[:, 1:].to(dev), ids.to(dev), {},
            [c / a.seq_len for c in counts])


class Runner:
    """One model, its AdamW, and the measurements of its steps."""

    def __init__(self, name: str, args: TransformerModelArgs, a: argparse.Namespace) -> None:
        self.name = name
        self.device = torch.device(a.device)
        self.model = build_model(args, self.device, DTYPES[a.dtype])
        self.n_params, self.flops_per_token = args.get_nparams_and_flops(self.model, a.seq_len)
        if a.compile:
            apply_compile(self.model, CompileConfig(enable=True, components=["model"]))
        # fused=True is TorchTitan's default optimizer implementation (CPU and CUDA).
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        # The dense twin and Llama3 take no modality ids.
        self.routed = isinstance(args, MoTModelArgs) and args.n_modalities > 1
        self.diffusion_weight = a.diffusion_weight
        self.times: list[float] = []
        self.page_faults: list[int] = []
        self.in_step_peak = 0

    def _train_step(self, tokens: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
                    diffusion: dict[str, torch.Tensor]) -> None:
        routing = {"modality_ids": ids} if self.routed else {}
        if diffusion:
            noise = diffusion["noise"]
            inputs = {k: v for k, v in diffusion.items() if k != "noise"}
            logits, eps = self.model(tokens, **routing, **inputs)
            image_sum, n_images = per_image_mse(eps, noise, inputs["image_ids"])
            loss = (F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
                    + self.diffusion_weight * image_sum / n_images)
        else:
            logits = self.model(tokens, **routing)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        self.optimizer.step()

    def step(self, batch: tuple[torch.Tensor, ...], measure: bool) -> None:
        # Freed outside the timed region so every step allocates its gradients afresh and
        # the in-step memory includes them on both devices.
        self.optimizer.zero_grad(set_to_none=True)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_bytes = torch.cuda.memory_allocated()
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        self._train_step(*batch)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if measure:
            self.times.append(elapsed)
            self.page_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
            if cuda:
                peak = torch.cuda.max_memory_allocated() - start_bytes
                self.in_step_peak = max(self.in_step_peak, peak)

    def track_cpu_memory(self, batch: tuple[torch.Tensor, ...]) -> None:
        """Peak bytes of live tensors above the step's start, over one untimed step.

        torch's MemTracker follows every tensor storage the step creates (a dispatch mode
        plus weakrefs), so this is the exact analogue of CUDA's `max_memory_allocated`,
        independent of how the host allocator reuses or returns memory.
        """
        self.optimizer.zero_grad(set_to_none=True)
        tracker = MemTracker()
        tracker.track_external(self.model, self.optimizer)
        # A dispatch mode cannot see inside compiled code: compiled blocks run eagerly here.
        with torch.compiler.set_stance("force_eager"), tracker:
            start = tracker.get_tracker_snapshot("current")[self.device][_TOTAL]
            self._train_step(*batch)
        self.in_step_peak = tracker.get_tracker_snapshot("peak")[self.device][_TOTAL] - start

    def state_bytes(self) -> int:
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        optim = sum(
            t.numel() * t.element_size()
            for state in self.optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor)
        )
        return params + optim


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def median_ci(xs: list[float], level: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """Bootstrap confidence interval of the median: how far a noisy shared machine leaves
    the measured ratio from the one a quiet machine would give (fixed seed: reproducible)."""
    gen = torch.Generator().manual_seed(0)
    data = torch.tensor(xs, dtype=torch.float64)
    picks = torch.randint(0, len(xs), (resamples, len(xs)), generator=gen)
    medians = data[picks].median(dim=1).values
    tail = (1 - level) / 2
    return float(medians.quantile(tail)), float(medians.quantile(1 - tail))




def pair_name(model: Runner, base: Runner) -> str:
    """"hybrid/mot", "moe4x/dense": a ratio's name without MoT's modality count."""
    return f"{model.name}/{base.name.split('(')[0]}"


def run(a: argparse.Namespace) -> dict:
    """Train the MoT model, its dense twin and Llama3 (not with `a.transfusion`) alternately;
    every figure, JSON-able.

    `a` holds the command line's settings (`python -m torchtitan_mot.benchmark --help`).
    """
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    resident = a.device == "cpu" and a.host_malloc == "resident" and keep_freed_memory_resident()
    args = build_args(a)
    mix = base_mix(a.mix, args.n_modalities)
    counters.clear()
    mot = Runner(f"mot({args.n_modalities})", args, a)
    dense = Runner("dense", dataclasses.replace(args, n_modalities=1), a)
    bases = (dense,) if a.transfusion else (dense, Runner("llama3", llama3_args(args), a))
    runners = (mot, *bases)
    schedule = DiffusionSchedule(a.diffusion_timesteps) if a.transfusion else None
    moe_pairs: list[tuple[Runner, Runner]] = []
    if a.moe_modalities:
        # The MoT paper's MoE-4x baseline (one FFN-MoE for every token) and the hybrid (MoT with
        # MoE FFNs on the named modalities), both at the [mot] default MoE shape: 4 experts of
        # the dense hidden size, top-1, so the active FLOPs per token are the dense twin's/MoT's.
        moe4x = Runner("moe4x", dataclasses.replace(args, n_modalities=1, moe_modalities=[0]), a)
        hybrid = Runner("hybrid", dataclasses.replace(args, moe_modalities=a.moe_modalities), a)
        runners += (moe4x, hybrid)
        moe_pairs = [(hybrid, mot), (moe4x, dense)]
    tokens_per_step = a.batch * a.seq_len
    settings = {
        "device": a.device, "dtype": a.dtype, "threads": torch.get_num_threads(),
        "compile": a.compile, "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads or args.n_heads, "vocab": a.vocab, "seq_len": a.seq_len,
        "batch": a.batch, "mix": [round(f, 3) for f in mix.tolist()], "mix_jitter": a.mix_jitter,
        "placement": a.placement, "warmup": a.warmup, "steps": a.steps,
        "host_malloc": "resident" if resident else "default",
        "transfusion": {"latent_shape": list(latent_shape(a)), "patch_size": a.patch_size,
                        "diffusion_weight": a.diffusion_weight} if a.transfusion else None,
    }

    def next_batch() -> tuple:
        if a.transfusion:
            return make_transfusion_batch(a, mix, gen, schedule)
        return make_batch(a, mix, gen)

    gen = torch.Generator().manual_seed(a.seed)
    seen_mixes: list[list[float]] = []
    for i in range(a.warmup + a.steps):
        measure = i >= a.warmup
        if i == a.warmup:
            warm_counts = CompileCounts.now()
        *batch, fractions = next_batch()
        if measure:
            seen_mixes.append(fractions)
        turn = i % len(runners)
        for runner in runners[turn:] + runners[:turn]:
            runner.step(tuple(batch), measure)
    end_counts = CompileCounts.now()
    if a.device == "cpu":
        batch = tuple(next_batch()[:-1])
        for runner in runners:
            runner.track_cpu_memory(batch)

    first = [round(f[0], 3) for f in seen_mixes]
    # TorchTitan's MFU: its peak bf16 FLOP/s table for the device (none for a CPU).
    peak_flops = (get_peak_flops(torch.cuda.get_device_name(a.device))
                  if a.device.startswith("cuda") else None)
    models = {}
    for r in runners:
        med = statistics.median(r.times)
        state, peak = r.state_bytes() / 2**20, r.in_step_peak / 2**20
        tflops = r.flops_per_token * tokens_per_step / med / 1e12
        models[r.name] = {
            "params": r.n_params, "flops_per_token": r.flops_per_token,
            "median_ms": med * 1e3, "min_ms": min(r.times) * 1e3,
            "p10_ms": percentile(r.times, 0.1) * 1e3, "p90_ms": percentile(r.times, 0.9) * 1e3,
            "tokens_per_s": tokens_per_step / med, "tflops": tflops,
            "state_mib": state, "in_step_mib": peak, "total_mib": state + peak,
            "faults_per_step": statistics.median(r.page_faults),
            "mfu_percent": 100 * tflops * 1e12 / peak_flops if peak_flops else None,
        }
    # Per-step ratio of the paired (same batch) steps: a steadier statistic than the ratio of
    # medians on a noisy box.
    paired = {}
    for model, base in [*((mot, base) for base in bases), *moe_pairs]:
        ratios = [m / d for m, d in zip(model.times, base.times)]
        lo, hi = median_ci(ratios)
        key = base.name if model is mot else pair_name(model, base)
        paired[key] = {"median": statistics.median(ratios), "ci95": [lo, hi],
                       "p10": percentile(ratios, 0.1), "p90": percentile(ratios, 0.9)}
    return {
        "settings": settings,
        "mix_seen": {"modality0_min": min(first), "modality0_max": max(first),
                     "distinct": len({tuple(f) for f in seen_mixes})},
        "memory_source": ("cuda max_memory_allocated" if a.device == "cuda"
                          else "torch.distributed._tools.mem_tracker.MemTracker (live tensors)"
                          + (", an eager step" if a.compile else "")),
        "models": models,
        "paired_ratio": paired,
        "compile": {"graphs": end_counts.graphs,
                    "recompiles": end_counts.since(warm_counts).graphs,
                    "graph_breaks": end_counts.graph_breaks} if a.compile else None,
        "step_time_ratio": {base.name: models[mot.name]["median_ms"] / models[base.name]["median_ms"]
                            for base in reversed(bases)},
        # "hybrid/mot", "moe4x/dense": the MoE models against their MoE-free twins.
        "moe_step_time_ratio": {pair_name(m, base): models[m.name]["median_ms"] / models[base.name]["median_ms"]
                                for m, base in moe_pairs},
    }
