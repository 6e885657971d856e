"""Train MoT and its dense twin with the same data, seed and steps; compare validation loss.

    python -m torchtitan_mot.compare_dense                    # text + image, debugmodel vs debugmodel_dense
    python -m torchtitan_mot.compare_dense --three-modality   # text + image + speech, debugmodel_3modality
    python -m torchtitan_mot.compare_dense --untie ffn --untie attention   # + MoT with only those untied
    python -m torchtitan_mot.compare_dense --config train_configs/mot_37M.toml --steps 2000 --seeds 3
    python -m torchtitan_mot.compare_dense --config train_configs/compare_transfusion.toml   # Transfusion setting

Each model is trained by the real trainer (`python -m torchtitan_mot.train`, the command users
run) on `--config` (default `train_configs/compare_dense.toml`): MoT is the config's flavor,
the dense twin is the registered flavor of the same shape with one modality. Per-modality
validation losses are read back from TensorBoard events (`torchtitan_mot.run_metrics`); in the
Transfusion setting `validation/loss/image` is the diffusion MSE at the validation split's fixed
stratified timesteps, so steps-to-match covers text CE and image diffusion loss alike.
Everything goes to the output folder `--out` (default `outputs/compare_dense`): the runs,
`mot_vs_dense.png` (one panel per modality, one line per seed), `mot_vs_dense.csv` and
`compare_dense.json` (every figure printed, for programs); `--png`, `--csv` and `--json`
name other files (e.g. the tracked `assets/mot_vs_dense.png` when refreshing the docs). Prints last,
per modality, the paper's measure: the fraction of the dense run's steps MoT needs to reach
the dense run's final validation loss (`>1.00` if it never does); with `--seeds K` its mean
and spread over K seeds (each seed changes initialisation; the data order is the dataset's).
Extra trainer flags go after `--`. Each `--untie SETTING` (a `mot.untie` value, e.g. `ffn` or
`attention,norms`) also trains the MoT flavor with only those components untied; the first
seed's runs then share one figure (`--untie-png`) and steps-to-match is printed for each
setting against the same dense run (figure: `untie_ablation.png`, or `--untie-png`).
`--moe` also trains the paper's MoE comparison (§3.2.1, §5): the MoE-4x baseline of the same
shape (shared attention, a 4-expert FFN for every token) and the hybrid (MoT whose text FFN
is MoE-4x), printed and plotted the same way (`moe.png`, or `--moe-png`).
"""

import argparse
import csv
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from torchtitan_mot.run_metrics import read_scalars
# --three-modality: the demo's text + image + speech setting, whatever the config says.
THREE = ["--model.flavor", "debugmodel_3modality",
         "--training.dataset_path", "assets/demo/text_image_speech",
         "--validation.dataset_path", "assets/demo/text_image_speech",
         "--mot.modalities", "text,image,speech", "--mot.codebook_sizes", "256", "256"]
Curve = list[tuple[int, float]]


def train(name: str, flavor: str, dump: Path, seed: int, args: argparse.Namespace,
          extra: list[str]) -> float:
    """One training run into `dump` (cleared first: a leftover checkpoint would resume)."""
    shutil.rmtree(dump, ignore_errors=True)
    dump.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "torchtitan_mot.train",
        "--job.config_file", str(args.config),
        "--job.dump_folder", str(dump),
        *extra,
        "--model.flavor", flavor,
        "--training.steps", str(args.steps),
        "--debug.seed", str(seed),
    ]
    print(f"[{name}] {' '.join(cmd[1:])}\n[{name}] log: {dump / 'train.log'}", flush=True)
    start = time.perf_counter()
    with open(dump / "train.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (dump / "train.log").read_text().splitlines()[-30:]
        sys.exit(f"[{name}] training failed (exit {proc.returncode}):\n" + "\n".join(tail))
    print(f"[{name}] done in {seconds:.0f} s", flush=True)
    return seconds


def read_curves(dump: Path, modalities: list[str]) -> dict[str, Curve]:
    """`validation/loss/<modality>` (and the total) from the run's TensorBoard events."""
    curves = {}
    for key in ["total", *modalities]:
        tag = "validation/loss" if key == "total" else f"validation/loss/{key}"
        curves[key] = sorted(read_scalars(dump, tag).items())
        if not curves[key]:
            raise FileNotFoundError(f"no {tag} in the TensorBoard events under {dump}")
    return curves


def steps_to_match(mot: Curve, dense: Curve) -> float:
    """First (linearly interpolated) step at which MoT's loss reaches dense's final loss,
    as a fraction of dense's final step; `inf` if it never does."""
    target, last_step = dense[-1][1], dense[-1][0]
    prev: tuple[int, float] | None = None
    for step, loss in mot:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return step / last_step
            s0, l0 = prev
            return (s0 + (l0 - target) / (l0 - loss) * (step - s0)) / last_step
        prev = (step, loss)
    return math.inf


def write_csv(path: Path, curves: dict[str, dict[str, Curve]]) -> None:
    """Wide table: step, then `<run>_<modality>` columns (empty where a run has no point)."""
    columns = [(m, k) for m in curves for k in curves[m]]
    table: dict[int, dict[tuple[str, str], float]] = {}
    for model, key in columns:
        for step, loss in curves[model][key]:
            table.setdefault(step, {})[(model, key)] = loss
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step"] + [f"{m}_{k}" for m, k in columns])
        for step in sorted(table):
            w.writerow([step] + [f"{table[step][c]:.6f}" if c in table[step] else "" for c in columns])


def plot(path: Path, runs: list[dict[str, dict[str, Curve]]], modalities: list[str],
         ratios: dict[str, list[float]], title: str) -> None:
    """One panel per modality, one line per model and seed; the dotted lines mark the first
    seed's dense final loss and MoT's matching step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(modalities), figsize=(4.2 * len(modalities), 3.4), squeeze=False)
    curves = runs[0]
    for ax, key in zip(axes[0], modalities):
        for i, run in enumerate(runs):
            for model, style in (("dense", "C0"), ("mot", "C3")):
                steps, losses = zip(*run[model][key])
                ax.plot(steps, losses, color=style, marker="." if i == 0 else None,
                        alpha=1.0 if i == 0 else 0.4, label=model if i == 0 else None)
        dense_final = curves["dense"][key][-1][1]
        ax.axhline(dense_final, color="C0", ls=":", lw=1, label="dense final")
        r = ratios[key][0]
        if math.isfinite(r):
            ax.axvline(r * curves["dense"][key][-1][0], color="C3", ls=":", lw=1)
        ax.set_title(f"{key}: steps-to-match {summarize(ratios[key])}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        lo = min(v for run in runs for m in ("dense", "mot") for _, v in run[m][key])
        ax.set_ylim(lo - 0.05 * abs(lo), lo + 2.0)  # the early steps would hide the tail
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


Run = tuple[str, list[str]]
"""An extra run's (flavor, trainer flags)."""


def moe_runs(flavor: str) -> dict[str, Run]:
    """The MoE-4x baseline of `flavor`'s shape and the hybrid (MoT with a text MoE FFN)."""
    from torchtitan_mot import moe4x_flavor

    return {"moe4x": (moe4x_flavor(flavor), []),
            "hybrid": (flavor, ["--mot.moe_modalities", "text"])}


def untie_runs(settings: list[str], flavor: str) -> dict[str, Run]:
    """Run name -> the MoT flavor with each `--untie` setting, checked before any training."""
    from torchtitan_mot.model.args import check_untie, UNTIE_COMPONENTS

    runs: dict[str, Run] = {}
    for setting in settings:
        components = setting.split(",")
        try:
            check_untie(components, n_modalities=2, setting=f"--untie {setting}")
        except ValueError as e:
            raise SystemExit(str(e)) from None
        name = "untie-" + "+".join(c for c in UNTIE_COMPONENTS if c in components)
        if set(components) == set(UNTIE_COMPONENTS):
            raise SystemExit(f"--untie {setting} is full MoT, which is always trained")
        if name in runs:
            raise SystemExit(f"--untie {setting} repeats --untie {runs[name][1][1]}")
        runs[name] = (flavor, ["--mot.untie", setting])
    return runs


def plot_runs(path: Path, curves: dict[str, dict[str, Curve]], modalities: list[str],
              title: str) -> dict[str, dict[str, float]]:
    """Every run of `curves` in one panel per modality; returns steps-to-match of each run
    but dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = {name: {k: steps_to_match(c[k], curves["dense"][k]) for k in ["total", *modalities]}
              for name, c in curves.items() if name != "dense"}
    fig, axes = plt.subplots(1, len(modalities), figsize=(4.6 * len(modalities), 3.8), squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(curves)}
    for ax, key in zip(axes[0], modalities):
        for name, c in curves.items():
            label = name if name == "dense" else f"{name} ({format_ratio(ratios[name][key])})"
            ax.plot(*zip(*c[key]), color=colors[name], marker=".", label=label)
        ax.axhline(curves["dense"][key][-1][1], color=colors["dense"], ls=":", lw=1)
        ax.set_title(f"{key}: validation loss (steps-to-match)", fontsize=9)
        ax.set_xlabel("step")
        lo = min(v for c in curves.values() for _, v in c[key])
        ax.set_ylim(lo - 0.05 * abs(lo), lo + 2.0)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ratios


def format_ratio(r: float) -> str:
    return f"{r:.2f}" if r <= 1.0 else ">1.00"


def summarize(ratios: list[float]) -> str:
    """One seed: the ratio. Several: mean and sample standard deviation over the seeds where
    MoT matched, the range, and how many seeds never matched."""
    if len(ratios) == 1:
        return format_ratio(ratios[0])
    matched = [r for r in ratios if r <= 1.0]
    missed = len(ratios) - len(matched)
    if not matched:
        return f">1.00 in all {len(ratios)} seeds"
    spread = statistics.stdev(matched) if len(matched) > 1 else 0.0
    text = (f"mean {statistics.mean(matched):.2f} sd {spread:.2f} "
            f"(range {min(matched):.2f}-{max(matched):.2f})")
    return text + (f", >1.00 in {missed} of {len(ratios)} seeds" if missed else "")


def config_setting(config: Path, extra: list[str]) -> tuple[str, str, list[str]]:
    """(MoT flavor, training data, modalities) the trainer will use: the job config as the
    trainer loads it (the config plus the trainer flags)."""
    from torchtitan_mot.config import load_job_config

    job = load_job_config(["--job.config_file", str(config), *extra])
    return job.model.flavor, job.training.dataset_path, list(job.mot.modalities)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m torchtitan_mot.compare_dense", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--three-modality", action="store_true", help="text+image+speech (debugmodel_3modality)")
    p.add_argument("--config", type=Path, default=Path("train_configs") / "compare_dense.toml")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=1,
                   help="number of seeds (seed, seed+1, ...): mean and spread of steps-to-match")
    p.add_argument("--out", type=Path, default=Path("outputs") / "compare_dense",
                   help="output folder: dump folders <out>/mot and <out>/dense, or "
                        "<out>/seed<S>/{mot,dense} with several seeds (checkpoints, logs, "
                        "TensorBoard), and the figure, CSV and JSON")
    p.add_argument("--png", type=Path, help="the curves figure (default <out>/mot_vs_dense.png)")
    p.add_argument("--csv", type=Path, help="the curves table (default <out>/mot_vs_dense.csv)")
    p.add_argument("--json", type=Path, help="every printed figure (default <out>/compare_dense.json)")
    p.add_argument("--skip-training", action="store_true", help="re-plot existing runs in --out")
    p.add_argument("--untie", action="append", default=[],
                   help="also train MoT with only these components untied (repeatable), e.g. ffn")
    p.add_argument("--untie-png", type=Path, help="the --untie figure (default <out>/untie_ablation.png)")
    p.add_argument("--moe", action="store_true",
                   help="also train the MoE-4x baseline and the hybrid (MoT with a text MoE)")
    p.add_argument("--moe-png", type=Path, help="the --moe figure (default <out>/moe.png)")
    p.add_argument("extra", nargs="*", help="trainer overrides, after `--`")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    args.out = args.out.resolve()
    png = args.png or args.out / "mot_vs_dense.png"
    csv_path = args.csv or args.out / "mot_vs_dense.csv"
    json_path = args.json or args.out / "compare_dense.json"
    extra = (THREE if args.three_modality else []) + args.extra
    flavor, data, modalities = config_setting(args.config, extra)
    from torchtitan_mot import dense_twin_flavor

    groups = {"untie": (untie_runs(args.untie, flavor), args.untie_png or args.out / "untie_ablation.png",
                        f"mot.untie settings vs full MoT and dense, {flavor}"),
              "moe": (moe_runs(flavor) if args.moe else {}, args.moe_png or args.out / "moe.png",
                      f"MoE-4x and hybrid (text MoE) vs MoT and dense, {flavor}")}
    runs_of: dict[str, Run] = {"mot": (flavor, []), "dense": (dense_twin_flavor(flavor), [])}
    for group_runs, _, _ in groups.values():
        runs_of.update(group_runs)
    flavors = {name: run[0] for name, run in runs_of.items()}
    seeds = list(range(args.seed, args.seed + args.seeds))
    keys = ["total", *modalities]
    runs: list[dict[str, dict[str, Curve]]] = []
    report: dict = {"config": str(args.config), "steps": args.steps, "data": data,
                    "flavors": flavors, "seeds": {}}
    for seed in seeds:
        out = args.out if len(seeds) == 1 else args.out / f"seed{seed}"
        seconds = {}
        for name, (model_flavor, flags) in runs_of.items():
            if not args.skip_training:
                seconds[name] = train(name, model_flavor, out / name, seed, args, extra + flags)
        curves = {name: read_curves(out / name, modalities) for name in flavors}
        runs.append(curves)
        report["seeds"][seed] = {}
        for name in flavors:
            final = {k: curves[name][k][-1][1] for k in keys}
            report["seeds"][seed][name] = {"final_validation_loss": final, "seconds": seconds.get(name),
                                           "checkpoint": str(out / name / "checkpoint")}
            took = f" in {seconds[name]:.0f} s" if name in seconds else ""
            print(f"seed {seed} {name}: final validation loss "
                  + "  ".join(f"{k} {v:.4f}" for k, v in final.items())
                  + f"{took}; checkpoint {out / name / 'checkpoint'}")
    ratios = {k: [steps_to_match(c["mot"][k], c["dense"][k]) for c in runs] for k in keys}

    for path in (png, csv_path, json_path, *(g[1] for g in groups.values())):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(csv_path, runs[0] if len(seeds) == 1 else {
        f"seed{seed}_{name}": curves for seed, run in zip(seeds, runs) for name, curves in run.items()
    })
    plot(png, runs, modalities, ratios,
         f"MoT ({flavors['mot']}) vs dense ({flavors['dense']}), {args.steps} steps, "
         f"seeds {seeds[0]}-{seeds[-1]}, {data}")
    print(f"wrote {png} and {csv_path}")
    # JSON has no infinity: a seed where MoT never matched is null.
    report["steps_to_match"] = {k: {"per_seed": [r if math.isfinite(r) else None for r in ratios[k]],
                                    "summary": summarize(ratios[k])} for k in keys}
    for key in keys:
        per_seed = "" if len(seeds) == 1 else "; per seed " + " ".join(map(format_ratio, ratios[key]))
        print(f"steps-to-match {key}: {summarize(ratios[key])}{per_seed}")
    for group, (group_runs, group_png, title) in groups.items():
        if not group_runs:
            continue
        shown = {name: runs[0][name] for name in ["dense", "mot", *group_runs]}
        by_run = plot_runs(group_png, shown, modalities,
                           f"{title}, {args.steps} steps, seed {seeds[0]}")
        print(f"wrote {group_png}")
        report[f"{group}_steps_to_match"] = {name: {k: v if math.isfinite(v) else None for k, v in r.items()}
                                             for name, r in by_run.items()}
        for name, r in by_run.items():
            if name in group_runs:
                print(f"steps-to-match {name}: " + "  ".join(f"{k} {format_ratio(v)}" for k, v in r.items()))
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
