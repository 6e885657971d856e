"""TorchTitan's integration feature matrix, run with `--model.name mot` on CPU/gloo.

TorchTitan 0.2.2 tests its trainer with 43 override sets (`tests/integration_tests/
features.py` in its repository). A user moving from Llama3 to MoT expects each of those flags
to keep working, so this module lists the same sets (adapted where noted) plus the precision
matrix, and runs each end to end through `python -m torchtitan_mot.train` on the debug MoT:

- every run starts from one seed checkpoint and reads a corpus duplicated 4x, so each
  data-parallel rank sees the single process's samples: a set that does not change the math
  must reproduce the single-process losses and grad norms ("parity");
- a set that changes the math (precision, batch) must train: finite losses that fall;
- a set MoT cannot support must be refused at start-up with a message naming the flag;
- a set that needs CUDA kernels (flex-attention backward, varlen flash attention, context
  parallel attention) is reported as such and run by the multi-GPU acceptance tests
  (tests/gpu/, `python scripts/gpu_acceptance.py --multi-gpu`).

tests/e2e/test_feature_matrix.py runs CI's subset; `python scripts/feature_matrix.py` all of it.
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.data import repeated_dataset
from harness.trainer import Run, run_trainer

STEPS = 10
BASE_OVERRIDES = (
    "--training.seq_len", "128",
    "--training.local_batch_size", "2",
    "--training.steps", str(STEPS),
    "--training.mixed_precision_param", "float32",
    "--lr_scheduler.warmup_steps", "2",
    "--metrics.log_freq", "1",
    "--debug.seed", "0",
    "--debug.deterministic",
    "--validation.freq", "5",
    "--validation.steps", "2",
    "--validation.seq_len", "128",
    "--validation.local_batch_size", "2",
)
"""Applied before every set's own overrides (which win). Full precision by default, so a set
that does not change the math is compared exactly; the precision sets choose theirs."""

# measured (2026-12-03: 2d_compile, pp_zbv, precision_tp2_default): loss 1e-5 (the printed digit),
# grad norm 5.4e-5 relative
PARITY_LOSS_ABS = 5e-5
PARITY_GRAD_REL = 2e-4
TRAINS_MIN_FALL = 3.0
"""A "trains" set's loss must fall this much in 10 steps (fp32 falls 7.685 -> 3.561)."""


@dataclass(frozen=True)
class FeatureSet:
    """One TorchTitan override set (several runs share a dump folder, as upstream)."""

    name: str
    runs: tuple[tuple[str, ...], ...]
    ngpu: int = 4
    check: str = "parity"
    """"parity" (same losses/grad norms as the single process), "trains" (finite, falling),
    "resumes" (the last run starts after the first's last step), or "refused"."""
    tolerance: float | None = None
    """For "trains": the largest |loss - fp32 loss| allowed at any step (None: the set trains
    on other batches, so there is no fp32 trajectory to compare with)."""
    needs_cuda: str = ""
    disabled: str = ""
    refusal: str = ""
    """For "refused": a regex the start-up error must match."""
    note: str = ""
    """How the set differs from TorchTitan's, if it does."""


def _s(*runs: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Each run's override strings split as a shell would (TorchTitan's runner does)."""
    return tuple(tuple(arg for a in run for arg in shlex.split(a)) for run in runs)


PP2 = ("--parallelism.pipeline_parallel_degree 2",)
TP2 = ("--parallelism.tensor_parallel_degree 2",)
FLEX = "flex-attention backward has no CPU kernel"
VARLEN = "varlen attention is a CUDA flash-attention kernel"
CP = "context-parallel attention has no CPU implementation (no DTensor strategy for CPU SDPA)"

TORCHTITAN_SETS: tuple[FeatureSet, ...] = (
    FeatureSet("default", _s(["--profiling.enable_profiling", "--metrics.enable_tensorboard",
                              "--profiling.profile_freq 5", "--profiling.profiler_warmup 1"])),
    FeatureSet("1d_compile", _s(["--compile.enable"])),
    FeatureSet("1d_compile_sac_op", _s(["--compile.enable", "--activation_checkpoint.mode selective",
                                        "--activation_checkpoint.selective_ac_option op"])),
    FeatureSet("2d_eager", _s(list(TP2))),
    FeatureSet("2d_compile", _s(["--compile.enable", *TP2])),
    FeatureSet("2d_asynctp_compile", _s(["--compile.enable", *TP2,
                                         "--parallelism.enable_async_tensor_parallel"]),
               disabled="disabled upstream (async TP CI issue)"),
    FeatureSet("full_checkpoint", _s(["--checkpoint.enable"],
                                     ["--checkpoint.enable", "--training.steps 20"]),
               check="resumes"),
    FeatureSet("model_only_hf_checkpoint", _s(
        ["--checkpoint.enable", "--checkpoint.folder hf_checkpoint",
         "--checkpoint.last_save_model_only", "--checkpoint.last_save_in_hf"],
        ["--checkpoint.enable", "--checkpoint.initial_load_path {dump}/hf_checkpoint/step-10",
         "--checkpoint.initial_load_model_only", "--checkpoint.initial_load_in_hf"])),
    FeatureSet("last_save_model_only_fp32", _s(["--checkpoint.enable", "--checkpoint.last_save_model_only"])),
    FeatureSet("last_save_model_only_bf16", _s(["--checkpoint.enable", "--checkpoint.last_save_model_only",
                                                "--checkpoint.export_dtype bfloat16"])),
    FeatureSet("pp_looped_zero_bubble", _s(["--parallelism.pipeline_parallel_degree 4",
                                            "--parallelism.pipeline_parallel_schedule InterleavedZeroBubble"])),
    FeatureSet("pp_zbv", _s([*PP2, "--parallelism.pipeline_parallel_schedule ZBVZeroBubble"]), ngpu=2),
    FeatureSet("pp_1f1b", _s([*PP2, "--parallelism.pipeline_parallel_schedule 1F1B",
                              "--parallelism.data_parallel_shard_degree 1"]), ngpu=2),
    FeatureSet("pp_gpipe", _s([*PP2, "--parallelism.pipeline_parallel_schedule GPipe",
                               "--parallelism.data_parallel_shard_degree 1"]), ngpu=2),
    FeatureSet("pp_dp_1f1b", _s(
        [*PP2, "--parallelism.pipeline_parallel_schedule 1F1B", "--parallelism.data_parallel_shard_degree 2"],
        [*PP2, "--parallelism.pipeline_parallel_schedule 1F1B",
         "--parallelism.pipeline_parallel_layers_per_stage 4", "--parallelism.data_parallel_shard_degree 2"])),
    FeatureSet("pp_dp_gpipe", _s([*PP2, "--parallelism.pipeline_parallel_schedule GPipe",
                                  "--parallelism.data_parallel_shard_degree 2"])),
    FeatureSet("pp_tp", _s([*PP2, *TP2])),
    FeatureSet("pp_dp_tp", _s(
        ["--checkpoint.enable", *PP2, "--parallelism.data_parallel_shard_degree 2", *TP2],
        ["--training.steps 20", "--checkpoint.enable", *PP2,
         "--parallelism.data_parallel_shard_degree 2", *TP2]), ngpu=8, check="resumes"),
    FeatureSet("3d_compile", _s([*PP2, "--parallelism.data_parallel_shard_degree 2", *TP2,
                                 "--compile.enable"]), ngpu=8),
    FeatureSet("pp_looped_1f1b", _s(
        ["--parallelism.pipeline_parallel_degree 4", "--parallelism.pipeline_parallel_schedule Interleaved1F1B"],
        ["--parallelism.pipeline_parallel_degree 4", "--parallelism.pipeline_parallel_schedule Interleaved1F1B",
         "--parallelism.pipeline_parallel_layers_per_stage 1"])),
    FeatureSet("pp_custom_csv", _s([*PP2, "--parallelism.pipeline_parallel_schedule PipelineScheduleMulti",
                                    "--parallelism.pipeline_parallel_schedule_csv {schedule_csv}",
                                    "--training.local_batch_size 8"]),
               ngpu=2, check="trains",
               note="TorchTitan's tests/assets/custom_schedule.csv (I and W actions), local batch 8"),
    FeatureSet("optimizer_foreach", _s(["--optimizer.name AdamW --optimizer.implementation foreach"]), ngpu=2),
    FeatureSet("ddp", _s(["--parallelism.data_parallel_shard_degree=1",
                          "--parallelism.data_parallel_replicate_degree=4"])),
    FeatureSet("hsdp", _s(["--parallelism.data_parallel_shard_degree=2",
                           "--parallelism.data_parallel_replicate_degree=2"])),
    FeatureSet("fsdp+flex_attn", _s(["--parallelism.data_parallel_shard_degree=4",
                                     "--activation_checkpoint.mode=full",
                                     "--model.flavor=debugmodel_flex_attn"]), needs_cuda=FLEX),
    FeatureSet("fsdp+flex_attn+per_op_sac", _s(["--parallelism.data_parallel_shard_degree=4",
                                                "--activation_checkpoint.mode=selective",
                                                "--activation_checkpoint.selective_ac_option=op",
                                                "--model.flavor=debugmodel_flex_attn"]), needs_cuda=FLEX),
    FeatureSet("fsdp+varlen_attn+per_op_sac", _s(["--parallelism.data_parallel_shard_degree=4",
                                                  "--activation_checkpoint.mode=selective",
                                                  "--activation_checkpoint.selective_ac_option=op",
                                                  "--model.flavor=debugmodel_varlen_attn"]), needs_cuda=VARLEN),
    FeatureSet("cp_allgather", _s(["--parallelism.context_parallel_degree=4",
                                   "--parallelism.context_parallel_rotate_method=allgather"]), needs_cuda=CP),
    FeatureSet("cp_alltoall", _s(["--parallelism.context_parallel_degree=4",
                                  "--parallelism.context_parallel_rotate_method=alltoall"]), needs_cuda=CP),
    FeatureSet("hsdp+tp", _s(["--parallelism.data_parallel_shard_degree=2",
                              "--parallelism.data_parallel_replicate_degree=2",
                              "--parallelism.tensor_parallel_degree=2"]), ngpu=8),
    FeatureSet("fsdp+cp", _s(["--parallelism.data_parallel_shard_degree=2",
                              "--parallelism.context_parallel_degree=2"]), needs_cuda=CP),
    FeatureSet("hsdp+cp_without_dp_shard", _s(["--parallelism.data_parallel_shard_degree=1",
                                               "--parallelism.data_parallel_replicate_degree=2",
                                               "--parallelism.context_parallel_degree=2"]), needs_cuda=CP),
    FeatureSet("hsdp+cp_with_dp_shard", _s(["--parallelism.data_parallel_shard_degree=2",
                                            "--parallelism.data_parallel_replicate_degree=2",
                                            "--parallelism.context_parallel_degree=2"]), ngpu=8, needs_cuda=CP),
    FeatureSet("fsdp+tp+cp", _s(["--parallelism.data_parallel_shard_degree=2",
                                 "--parallelism.tensor_parallel_degree=2",
                                 "--parallelism.context_parallel_degree=2"]), ngpu=8, needs_cuda=CP),
    FeatureSet("cpu_offload+opt_in_bwd+TP+DP+CP", _s(
        ["--checkpoint.enable", "--parallelism.tensor_parallel_degree=2",
         "--parallelism.context_parallel_degree=2", "--training.enable_cpu_offload",
         "--optimizer.early_step_in_backward"]), ngpu=8, check="refused",
        refusal=r"optimizer\.early_step_in_backward and fault tolerance are not supported",
        note="refused at start-up: the non-finite guard must decide before any parameter is "
             "stepped (docs/feature_matrix.md); CPU offload alone is the cpu_offload set"),
    FeatureSet("fsdp2_memory_estimation", _s(["--memory_estimation.enable"]), ngpu=2,
               disabled="disabled upstream"),
    FeatureSet("test_generate", _s(["--checkpoint.enable"]), ngpu=2,
               note="the generation step is tests/test_generate.py"),
    FeatureSet("fsdp_reshard_always", _s(["--parallelism.fsdp_reshard_after_forward always"]), ngpu=2),
    FeatureSet("optional_checkpoint", _s(
        ["--checkpoint.enable"],
        ["--checkpoint.enable", "--checkpoint.exclude_from_loading lr_scheduler,dataloader,optimizer",
         "--parallelism.tensor_parallel_degree 2", "--training.steps 20"]), check="resumes"),
    FeatureSet("float8_emulation", _s(["--model.converters quantize.linear.float8",
                                       "--quantize.linear.float8.enable_fsdp_float8_all_gather",
                                       "--quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp",
                                       "--quantize.linear.float8.emulate"]),
               check="trains", tolerance=0.03),
    FeatureSet("gradient_accumulation", _s(["--training.local_batch_size 8",
                                            "--training.global_batch_size 32"]), ngpu=2,
               check="trains"),
    FeatureSet("validation_tp_cp_pp", _s(["--validation.enable", "--parallelism.tensor_parallel_degree=2",
                                          "--parallelism.context_parallel_degree=2",
                                          "--parallelism.pipeline_parallel_degree=2",
                                          "--parallelism.pipeline_parallel_schedule Interleaved1F1B"]),
               ngpu=8, needs_cuda=CP, note="MoT validation reads [validation].dataset_path (no c4_test)"),
    FeatureSet("dataloader_kwargs", _s(["--training.dataloader.num_workers 2",
                                        "--training.dataloader.pin_memory",
                                        "--training.dataloader.persistent_workers",
                                        "--training.dataloader.prefetch_factor 4"]), ngpu=2,
               check="trains", note="2 workers split the rows between them, so each step "
                                    "reads other samples than the single process"),
)
"""TorchTitan 0.2.2's `build_features_test_list()`, in its order, adapted to MoT."""

BF16 = ("--training.mixed_precision_param bfloat16",)
PRECISION_SETS: tuple[FeatureSet, ...] = (
    FeatureSet("precision_autocast_bf16", _s([*BF16, "--validation.enable"]), ngpu=1,
               check="trains", tolerance=0.006, note="TorchTitan's default precision: autocast"),
    FeatureSet("precision_ddp2_autocast", _s([*BF16, "--parallelism.data_parallel_shard_degree 1",
                                              "--parallelism.data_parallel_replicate_degree 2"]),
               ngpu=2, check="trains", tolerance=0.006),
    FeatureSet("precision_fsdp2_bf16", _s([*BF16, "--training.mixed_precision_reduce float32",
                                           "--parallelism.data_parallel_shard_degree 2"]),
               ngpu=2, check="trains", tolerance=0.015),
    FeatureSet("precision_hsdp2x2_bf16", _s([*BF16, "--parallelism.data_parallel_shard_degree 2",
                                             "--parallelism.data_parallel_replicate_degree 2"]),
               ngpu=4, check="trains", tolerance=0.015),
    FeatureSet("precision_pp2_fsdp2_bf16", _s([*BF16, *PP2, "--parallelism.data_parallel_shard_degree 2"]),
               ngpu=4, check="trains", tolerance=0.015),
    FeatureSet("precision_pure_bf16", _s(["--training.dtype bfloat16", *BF16]), ngpu=1,
               check="trains", tolerance=0.015, note="bf16 weights and optimizer state"),
    FeatureSet("precision_tp2_default", _s([*BF16, *TP2]), ngpu=2, check="parity",
               note="TorchTitan runs TP without FSDP in fp32 (it says so at start-up)"),
    FeatureSet("cpu_offload", _s(["--training.enable_cpu_offload"]), ngpu=2),
)

FEATURE_SETS: tuple[FeatureSet, ...] = TORCHTITAN_SETS + PRECISION_SETS

def _csv_rank(first: int, second: int) -> str:
    pairs = [f"{s}{a}{m}" for k in range(4) for s in (second, first)
             for m in (2 * k, 2 * k + 1) for a in "IW"]
    return ",".join([f"{first}F{m}" for m in range(8)] + [f"{second}F{m}" for m in range(8)] + pairs)


CUSTOM_SCHEDULE_CSV = _csv_rank(0, 2) + "\n" + _csv_rank(1, 3) + "\n"
"""TorchTitan's tests/assets/custom_schedule.csv (not in the wheel): 2 ranks holding stages
(0, 2) and (1, 3), 8 microbatches, backward split into I (input) and W (weight) actions."""

CI_SUBSET = (
    "2d_compile", "pp_zbv", "float8_emulation", "cpu_offload+opt_in_bwd+TP+DP+CP",
    "precision_autocast_bf16", "precision_ddp2_autocast", "precision_fsdp2_bf16",
    "precision_pure_bf16", "precision_pp2_fsdp2_bf16", "precision_tp2_default",
)
"""What CI runs (one of each kind of fix, and the precision matrix); all of them:
`python scripts/feature_matrix.py` (about 40 minutes on 2 cores)."""


@dataclass
class Outcome:
    name: str
    status: str  # "passed", "failed", "needs CUDA", "disabled"
    detail: str = ""
    seconds: float = 0.0
    losses: dict[int, tuple[float, float]] = field(default_factory=dict)


class FeatureMatrix:
    """Runs feature sets against one shared seed checkpoint, data copy and references."""

    def __init__(self, repo: Path, workdir: Path, timeout: int = 900) -> None:
        self.repo = repo.resolve()
        self.workdir = workdir.resolve()
        self.timeout = timeout
        self._seed: list[str] | None = None
        self._references: dict[tuple[str, ...], dict[int, tuple[float, float]]] = {}

    # -- running the trainer ----------------------------------------------------------------

    def run_trainer(self, args: Sequence[str], nproc: int) -> Run:
        """`python -m torchtitan_mot.train` (torchrun when nproc > 1, every rank's output)."""
        return run_trainer(args, nproc, log_rank=None, check=False, timeout=self.timeout,
                           cwd=self.repo)

    def base_args(self, dump: Path) -> list[str]:
        return ["--job.config_file", str(self.repo / "train_configs" / "debug_mot.toml"),
                "--training.dataset_path", str(self.data_dir),
                "--validation.dataset_path", str(self.data_dir),
                "--job.dump_folder", str(dump), *BASE_OVERRIDES]

    @property
    def data_dir(self) -> Path:
        """The demo corpus with its train rows 4x: DP ranks (up to 4) read the same samples
        as one process, so the global batch is the single process's."""
        data = self.workdir / "data"
        if not data.exists():
            tmp = self.workdir / "data.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            repeated_dataset(self.repo / "assets" / "demo" / "text_image", tmp, 4).rename(data)
        return data

    def seed_args(self) -> list[str]:
        """Start every run from one seed checkpoint: the same initial weights for any layout
        (pipeline stages would otherwise draw their own)."""
        if self._seed is None:
            root = self.workdir / "seed"
            if not (root / "checkpoint" / "step-0" / ".metadata").exists():
                shutil.rmtree(root, ignore_errors=True)
                run = self.run_trainer(
                    [*self.base_args(root), "--checkpoint.enable", "--checkpoint.create_seed_checkpoint"], 1)
                if run.returncode:
                    raise RuntimeError(f"seed checkpoint failed:\n{run.log[-4000:]}")
            self._seed = ["--checkpoint.enable", "--checkpoint.initial_load_path",
                          str(root / "checkpoint" / "step-0"), "--checkpoint.interval", "1000"]
        return self._seed

    def reference(self, extra: Sequence[str] = ()) -> dict[int, tuple[float, float]]:
        """Single-process fp32 losses and grad norms for the base arguments (plus `extra`)."""
        key = tuple(extra)
        if key not in self._references:
            dump = self.workdir / ("reference" + "".join(a.replace("-", "_") for a in key))
            shutil.rmtree(dump, ignore_errors=True)
            run = self.run_trainer([*self.base_args(dump), *self.seed_args(), *extra], 1)
            if run.returncode:
                raise RuntimeError(f"reference run failed:\n{run.log[-4000:]}")
            self._references[key] = run.steps()
        return self._references[key]

    # -- one set ----------------------------------------------------------------------------

    def run(self, fs: FeatureSet) -> Outcome:
        if fs.disabled:
            return Outcome(fs.name, "disabled", fs.disabled)
        if fs.needs_cuda and not _cuda_gpus() >= fs.ngpu:
            return Outcome(fs.name, "needs CUDA", fs.needs_cuda)
        start = time.monotonic()
        try:
            status, detail, losses = self._run(fs)
        except subprocess.TimeoutExpired:
            status, detail, losses = "failed", f"timed out after {self.timeout} s", {}
        return Outcome(fs.name, status, detail, time.monotonic() - start, losses)

    def _run(self, fs: FeatureSet) -> tuple[str, str, dict[int, tuple[float, float]]]:
        dump = self.workdir / "sets" / re.sub(r"[^\w.+-]", "_", fs.name)
        shutil.rmtree(dump, ignore_errors=True)
        fields = {"dump": str(dump), "schedule_csv": str(self.schedule_csv())}
        logs: list[dict[int, tuple[float, float]]] = []
        for i, overrides in enumerate(fs.runs):
            args = [*self.base_args(dump), *self.seed_args(), *(a.format(**fields) for a in overrides)]
            run = self.run_trainer(args, fs.ngpu)
            if fs.check == "refused":
                if run.returncode and re.search(fs.refusal, run.log) and not run.steps():
                    return "passed", f"refused at start-up ({fs.refusal})", {}
                return "failed", f"expected a start-up refusal matching {fs.refusal!r} before step 1; " + _tail(run.log), {}
            if run.returncode:
                return "failed", f"run {i + 1} exited {run.returncode}: " + _tail(run.log), {}
            logs.append(run.steps())
        first, last = logs[0], logs[-1]
        if fs.check == "resumes":
            if not last or min(last) != max(first) + 1:
                return "failed", f"run 2 logged steps {sorted(last)[:3]}..., expected to resume at {max(first) + 1}", last
            return _finite(last) or ("passed", f"resumed at step {min(last)}", last)
        bad = _finite(first)
        if bad:
            return bad
        if sorted(first) != list(range(1, STEPS + 1)):
            return "failed", f"logged steps {sorted(first)}", first
        ref = self.reference()
        if fs.check == "parity":
            for step, (loss, norm) in ref.items():
                got_loss, got_norm = first[step]
                if abs(got_loss - loss) > PARITY_LOSS_ABS or abs(got_norm - norm) > PARITY_GRAD_REL * norm:
                    return ("failed", f"step {step}: loss {got_loss} grad_norm {got_norm} vs single "
                            f"process {loss} / {norm}", first)
            return "passed", "same losses and grad norms as one process", first
        # "trains": falls, and stays within the stated tolerance of the fp32 trajectory
        if not first[STEPS][0] < first[1][0] - TRAINS_MIN_FALL:
            return "failed", f"loss did not fall: {first[1][0]} -> {first[STEPS][0]}", first
        if fs.tolerance is None:  # another batch: no fp32 trajectory to compare with
            return "passed", f"loss {first[1][0]:.3f} -> {first[STEPS][0]:.3f}", first
        worst = max(abs(first[s][0] - ref[s][0]) for s in ref)
        if worst > (fs.tolerance or 0.0):
            return "failed", f"max |loss - fp32 loss| = {worst:.4f} > {fs.tolerance}", first
        return "passed", f"loss {first[1][0]:.3f} -> {first[STEPS][0]:.3f}; max |loss - fp32| {worst:.4f}", first

    def schedule_csv(self) -> Path:
        path = self.workdir / "custom_schedule.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(CUSTOM_SCHEDULE_CSV)
        return path


def _cuda_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _finite(steps: dict[int, tuple[float, float]]) -> tuple[str, str, dict] | None:
    bad = {s: v for s, v in steps.items() if not all(math.isfinite(x) for x in v)}
    return ("failed", f"non-finite at steps {sorted(bad)}", steps) if bad else None


def _tail(log: str, lines: int = 12) -> str:
    keep = [line for line in log.splitlines() if "Error" in line or "error" in line]
    return " | ".join((keep or log.splitlines())[-lines:])[-1500:]


def summary_line(outcomes: Sequence[Outcome]) -> str:
    count = {s: sum(o.status == s for o in outcomes) for s in ("passed", "failed", "needs CUDA", "disabled")}
    return (f"feature matrix: {count['passed']} passed, {count['failed']} failed, "
            f"{count['needs CUDA']} need CUDA, {count['disabled']} disabled upstream")
