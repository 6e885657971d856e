"""Check an MoT sharding plan and estimate per-GPU memory, without GPUs.

    python -m torchtitan_mot.check_plan --config train_configs/mot_8B_3modality.toml
    python -m torchtitan_mot.check_plan --flavor 70B_3modality --ngpu 256 --tp 8 --pp 4

The first line is the verdict; then the layout and one row per pipeline stage (the first
rank of each). `--verbose` adds the memory model's assumptions (`torchtitan_mot.plan`,
docs/memory.md). A shipped config states the GPUs it is planned for in a
`# check_plan: --ngpu N --gpu-gib G  (note)` comment line; flags override it. Exits 1 when
the largest rank does not fit.
"""

import argparse
import re
import shlex
import sys
from pathlib import Path

from torchtitan_mot import mot_args
from torchtitan_mot.config import load_job_config
from torchtitan_mot.plan import ASSUMPTIONS, build_plan, LLAMA3_TEXT_VOCAB, Plan, USABLE

COMMENT = re.compile(r"^#\s*check_plan:(.*)$", re.M)

# check_plan flag -> the job-config flag it sets
_TITAN_FLAGS = {
    "flavor": "--model.flavor", "tp": "--parallelism.tensor_parallel_degree",
    "pp": "--parallelism.pipeline_parallel_degree", "cp": "--parallelism.context_parallel_degree",
    "ep": "--parallelism.expert_parallel_degree",
    "dp_replicate": "--parallelism.data_parallel_replicate_degree",
    "dp_shard": "--parallelism.data_parallel_shard_degree", "seq_len": "--training.seq_len",
    "local_batch_size": "--training.local_batch_size",
    "microbatch_size": "--parallelism.pipeline_parallel_microbatch_size",
    "ac": "--activation_checkpoint.mode",
    "selective_ac_option": "--activation_checkpoint.selective_ac_option",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m torchtitan_mot.check_plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a training TOML; the flags below then override it")
    p.add_argument("--flavor", choices=sorted(mot_args), help="model.flavor (required without --config)")
    p.add_argument("--ngpu", type=int, help="GPUs (required without --config)")
    p.add_argument("--gpu-gib", type=float, help="memory of one GPU (default 80 without --config)")
    p.add_argument("--tp", type=int)
    p.add_argument("--pp", type=int)
    p.add_argument("--cp", type=int)
    p.add_argument("--ep", type=int, help="expert parallel (MoE flavors; divides dp_shard)")
    p.add_argument("--dp-replicate", type=int)
    p.add_argument("--dp-shard", type=int, help="-1: whatever is left")
    p.add_argument("--seq-len", type=int, help="default 8192 without --config")
    p.add_argument("--local-batch-size", type=int, help="sequences per data-parallel rank per step "
                   "(default without --config: 1, or 2*pp with PP)")
    p.add_argument("--microbatch-size", type=int)
    p.add_argument("--ac", choices=["full", "selective", "none"], help="default full without --config")
    p.add_argument("--selective-ac-option", help="'op' or N (every Nth layer)")
    p.add_argument("--codebook-sizes", type=int, nargs="+",
                   help="mot.codebook_sizes, one per non-text modality (default without --config: 8192 each)")
    p.add_argument("--verbose", action="store_true", help="also print the memory model's assumptions")
    return p


def planned_for(path: str) -> argparse.Namespace:
    """`--ngpu` and `--gpu-gib` from the config's `# check_plan:` comment line."""
    found = COMMENT.findall(Path(path).read_text())
    if len(found) != 1:
        raise ValueError(
            f"{path}: expected one '# check_plan: --ngpu N --gpu-gib G  (note)' comment line "
            f"naming the GPUs this config is planned for, found {len(found)}"
        )
    p = argparse.ArgumentParser(prog=f"{path}: # check_plan:", add_help=False)
    p.add_argument("--ngpu", type=int, required=True)
    p.add_argument("--gpu-gib", type=float, required=True)
    return p.parse_args(shlex.split(found[0].split("(", 1)[0]))


def check_plan(argv: list[str]) -> Plan:
    """The plan of a config (or of command-line flags alone): check_plan's flags become
    job-config overrides, loaded the way the trainer loads its config."""
    a = _parser().parse_args(argv)
    overrides: list[str] = []
    if a.config:
        source = a.config
        planned = planned_for(a.config)
        a.ngpu = a.ngpu or planned.ngpu
        a.gpu_gib = a.gpu_gib or planned.gpu_gib
        overrides += ["--job.config_file", a.config]
    else:
        if a.flavor is None or a.ngpu is None:
            raise SystemExit("check_plan: --flavor and --ngpu are required without --config")
        source = "command line"
        pp = a.pp or 1
        a.gpu_gib = a.gpu_gib or 80.0
        a.seq_len = a.seq_len or 8192
        a.local_batch_size = a.local_batch_size or (2 * pp if pp > 1 else 1)
        a.ac = a.ac or "full"
        n_mod = max(2, mot_args[a.flavor].n_modalities)  # the dense twin still reads image tokens
        a.codebook_sizes = a.codebook_sizes or [8192] * (n_mod - 1)
        overrides += ["--model.hf_assets_path", "", "--training.mixed_precision_param", "bfloat16",
                      "--mot.modalities", ",".join(["text", "image", "speech"][:n_mod])]
    if a.codebook_sizes:
        overrides += ["--mot.codebook_sizes", *map(str, a.codebook_sizes)]
    for name, flag in _TITAN_FLAGS.items():
        if getattr(a, name) is not None:
            overrides += [flag, str(getattr(a, name))]
    # The plan reads no data: the vocabulary is the config's tokenizer, or Llama3's text ids.
    job = load_job_config(overrides, read_data=False, text_vocab_fallback=LLAMA3_TEXT_VOCAB)
    return build_plan(source, job, a.ngpu, a.gpu_gib)


def verdict(plan: Plan) -> str:
    """One line: does the largest rank fit, by how much."""
    worst, usable = plan.worst.total_gib, USABLE * plan.gpu_gib
    if plan.fits:
        return (f"fits: the largest rank needs {worst:.1f} GiB of {usable:.1f} GiB usable "
                f"({USABLE:.0%} of {plan.gpu_gib:g} GiB)")
    return (f"does NOT fit: the largest rank needs {worst:.1f} GiB, {worst - usable:.1f} GiB over "
            f"the {usable:.1f} GiB usable ({USABLE:.0%} of {plan.gpu_gib:g} GiB)")


COLUMNS = ("stage", "rank", "layers", "params/rank", "model state GiB", "unsharded blocks",
           "FSDP gathered GiB", "activations GiB", "total GiB", "wq.0 placement")


def format_plan(plan: Plan, verbose: bool = False) -> str:
    """The report: verdict, layout, (assumptions,) one row per stage, the shard sum."""
    job, p = plan.job, plan.job.parallelism
    ac = job.activation_checkpoint
    ac_text = f"{ac.mode} ({ac.selective_ac_option})" if ac.mode == "selective" else ac.mode
    lines = [
        f"check_plan: {verdict(plan)}",
        f"{plan.source}: {job.model.flavor} on {plan.ngpu} GPUs of {plan.gpu_gib:g} GiB = dp_replicate "
        f"{p.data_parallel_replicate_degree} x dp_shard {plan.dp_shard} x cp "
        f"{p.context_parallel_degree} x tp {p.tensor_parallel_degree} x pp {p.pipeline_parallel_degree}"
        f"{f' (ep {p.expert_parallel_degree})' if p.expert_parallel_degree > 1 else ''}; "
        f"seq_len {job.training.seq_len}, local batch {job.training.local_batch_size}, micro-batch "
        f"{p.pipeline_parallel_microbatch_size}, AC {ac_text}, FSDP reshard policy "
        f"{p.fsdp_reshard_after_forward}; vocab {plan.vocab.vocab_size:,} = {plan.vocab_source} + "
        f"codebooks {list(plan.vocab.codebook_sizes)} + 2 markers each",
    ]
    if verbose:
        lines.append(ASSUMPTIONS)
    rows = [COLUMNS] + [
        (str(r.stage), str(r.rank), str(r.layers), f"{r.params / 1e9:.3f}B", f"{r.state_gib:.1f}",
         str(r.unsharded_blocks), f"{r.fsdp_gib:.1f}", f"{r.act_gib:.1f}", f"{r.total_gib:.1f}",
         r.sharding)
        for r in plan.stages
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    for row in rows:
        lines.append(" | ".join(cell.rjust(w) for cell, w in zip(row, widths)) + " | " + row[-1])
    lines.append(f"sum over stages of one rank's shard: "
                 f"{sum(r.params for r in plan.stages) / 1e9:.3f}B params")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        plan = check_plan(argv)
    except ValueError as e:  # ConfigError and the parallelizer's refusals name their setting
        print(f"check_plan: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(format_plan(plan, verbose=_parser().parse_args(argv).verbose))
    if not plan.fits:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
