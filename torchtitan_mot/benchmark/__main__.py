"""Training step time of an MoT model against its dense twin and TorchTitan's Llama3.

    python -m torchtitan_mot.benchmark --flavor debugmodel --seq-len 2048 --batch 4 --steps 20
    python -m torchtitan_mot.benchmark --dim 2048 --n-layers 16 --compile --json bench.json
    python -m torchtitan_mot.benchmark --transfusion --seq-len 2048 --batch 4 --steps 10
    python -m torchtitan_mot.benchmark --moe-modalities 0   # + the hybrid (text MoE) and MoE-4x

Prints a table (one row per model) and the step-time ratios; `--json FILE` also writes every
figure for programs to read. What is measured and how: `torchtitan_mot.benchmark.step_time`.
"""

import argparse
import json
from pathlib import Path

import torch

from torchtitan_mot import mot_args
from torchtitan_mot.benchmark.step_time import DTYPES, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m torchtitan_mot.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="debugmodel", choices=sorted(mot_args))
    p.add_argument("--dim", type=int, help="overrides the flavor's dim")
    p.add_argument("--n-layers", type=int, help="overrides the flavor's n_layers")
    p.add_argument("--n-heads", type=int, help="overrides the flavor's n_heads")
    p.add_argument("--n-kv-heads", type=int, help="overrides the flavor's n_kv_heads")
    p.add_argument("--n-modalities", type=int, help="overrides the flavor's (must be > 1)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--mix", default=None, help="per-modality token fractions, e.g. 0.5,0.5")
    p.add_argument("--mix-jitter", type=float, default=0.2,
                   help="each fraction moves by U(-j, j) per step before renormalising")
    p.add_argument("--placement", choices=("segments", "random"), default="segments")
    p.add_argument("--segment-len", type=int, default=128, help="mean run length (segments)")
    p.add_argument("--steps", type=int, default=20, help="measured steps per model")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps per model")
    p.add_argument("--compile", action="store_true", help="per-block torch.compile(fullgraph)")
    p.add_argument("--moe-modalities", type=int, nargs="+", default=[],
                   help="also train the hybrid (MoT whose FFN of these modality ids is a 4-expert "
                        "top-1 MoE, e.g. 0 for text) and the MoE-4x baseline (one MoE FFN for all "
                        "tokens); prints hybrid/mot and moe4x/dense step time ratios")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter and activation dtype, no autocast (default: bf16 on "
                        "CUDA, fp32 elsewhere)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--host-malloc", choices=("resident", "default"), default="resident",
                   help="CPU: keep freed memory in glibc's heap between steps (see "
                        "keep_freed_memory_resident) or leave "
                        "glibc's defaults, under which page faults dominate the step time")
    p.add_argument("--transfusion", action="store_true",
                   help="the Transfusion setting: MoT with diffusion layers vs its dense twin "
                        "(no Llama3), images as BOI + latent patches + EOI, CE + diffusion loss")
    p.add_argument("--latent-shape", default="8,32,32", help="--transfusion: latent C,H,W")
    p.add_argument("--patch-size", type=int, default=2, help="--transfusion: latent patch size")
    p.add_argument("--diffusion-timesteps", type=int, default=1000, help="--transfusion: T")
    p.add_argument("--diffusion-weight", type=float, default=5.0,
                   help="--transfusion: lambda of the image loss")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    a = p.parse_args(argv)
    if a.moe_modalities and a.compile:
        p.error("--compile with --moe-modalities: the benchmark compiles whole blocks with "
                "fullgraph, which TorchTitan's MoE cannot be (it reads token counts on the host)")
    if a.moe_modalities and a.transfusion:
        p.error("--moe-modalities with --transfusion: measure one setting at a time")
    if a.dtype is None:
        a.dtype = "bf16" if a.device.startswith("cuda") else "fp32"
    return a


def report(result: dict) -> str:
    """The human-readable form of `run`'s result."""
    s, models = result["settings"], result["models"]
    mix, seen = result["mix_seen"], s["mix"]
    lines = [
        f"device={s['device']} dtype={s['dtype']} threads={s['threads']} compile={s['compile']} "
        f"dim={s['dim']} n_layers={s['n_layers']} n_heads={s['n_heads']} "
        f"n_kv_heads={s['n_kv_heads']} vocab={s['vocab']} seq_len={s['seq_len']} "
        f"batch={s['batch']} mix={seen}±{s['mix_jitter']} placement={s['placement']} "
        f"warmup={s['warmup']} steps={s['steps']} host_malloc={s['host_malloc']}",
        f"modality-0 fraction over measured steps: min {mix['modality0_min']} max "
        f"{mix['modality0_max']} ({mix['distinct']} distinct mixes)",
        "active FLOPs per token (fwd+bwd, TorchTitan's count): "
        + "  ".join(f"{name} {m['flops_per_token']:.4g}" for name, m in models.items()),
        f"in-step memory from: {result['memory_source']}",
    ]
    header = (f"{'model':<8} {'params':>9} {'median ms':>10} {'min ms':>8} {'p10-p90 ms':>17} "
              f"{'tok/s':>9} {'TFLOP/s':>8} {'state MiB':>10} {'in-step MiB':>12} "
              f"{'total MiB':>10} {'faults/step':>11} {'MFU %':>6}")
    lines += [header, "-" * len(header)]
    for name, m in models.items():
        spread = f"{m['p10_ms']:.1f}-{m['p90_ms']:.1f}"
        mfu = "-" if m["mfu_percent"] is None else f"{m['mfu_percent']:.1f}"
        lines.append(
            f"{name:<8} {m['params'] / 1e6:>8.2f}M {m['median_ms']:>10.1f} {m['min_ms']:>8.1f} "
            f"{spread:>17} {m['tokens_per_s']:>9.0f} {m['tflops']:>8.3f} {m['state_mib']:>10.1f} "
            f"{m['in_step_mib']:>12.1f} {m['total_mib']:>10.1f} {m['faults_per_step']:>11.0f} {mfu:>6}")
    for base, r in result["paired_ratio"].items():
        pair = base if "/" in base else f"mot/{base}"
        lines.append(f"paired per-step ratio {pair}: median {r['median']:.3f} "
                     f"(95% CI {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}) "
                     f"p10-p90 {r['p10']:.3f}-{r['p90']:.3f}")
    if result["compile"]:
        c = result["compile"]
        lines.append(f"compile: unique graphs {c['graphs']}, {c['recompiles']} compiled during the "
                     f"{s['steps']} measured steps (recompiles), graph breaks {c['graph_breaks']}")
    prefix = "transfusion " if s["transfusion"] else ""
    for pair, ratio in result["moe_step_time_ratio"].items():
        lines.append(f"{pair} step time ratio: {ratio:.3f}")
    for base, ratio in result["step_time_ratio"].items():
        lines.append(f"{prefix}mot/{base} step time ratio: {ratio:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    result = run(a)
    print(report(result))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
