"""`python -m torchtitan_mot.benchmark` runs end to end; its JSON holds what the README's
tables quote and its table prints them."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_smoke(tmp_path: Path) -> None:
    """Tiny shape, compiled, two measured steps of different modality mixes: the table (MoT,
    dense twin, TorchTitan's Llama3), the paired ratios, the compile counters (one graph per
    model, shared by its blocks; no recompile; no graph break) and the two ratio lines."""
    out = subprocess.run(
        [sys.executable, "-m", "torchtitan_mot.benchmark", "--dim", "128", "--n-layers", "2",
         "--n-heads", "2", "--seq-len", "64", "--batch", "2", "--vocab", "64",
         "--steps", "2", "--warmup", "1", "--threads", "1", "--device", "cpu", "--compile",
         "--json", str(tmp_path / "bench.json")],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    models = result["models"]
    assert list(models) == ["mot(2)", "dense", "llama3"], out
    # params and state MiB: MoT holds every non-embedding weight twice (+ its AdamW moments).
    assert models["mot(2)"]["params"] > models["dense"]["params"]
    assert models["mot(2)"]["state_mib"] > models["dense"]["state_mib"]
    # The dense twin and Llama3 of the same shape hold the same parameters.
    assert models["dense"]["params"] == models["llama3"]["params"]
    assert models["llama3"]["mfu_percent"] is None  # no MFU without a GPU peak
    assert result["settings"]["host_malloc"] == "resident"
    for base in ("dense", "llama3"):
        paired = result["paired_ratio"][base]
        assert paired["ci95"][0] <= paired["median"] <= paired["ci95"][1]
    assert result["mix_seen"]["distinct"] == 2  # a count-specialised graph would recompile
    assert result["compile"] == {"graphs": 3, "recompiles": 0, "graph_breaks": 0}
    # The printed table says the same.
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("mot(2)", "dense", "llama3"))}
    assert set(rows) == {"mot(2)", "dense", "llama3"} and rows["llama3"][-1] == "-", out
    # Two measured steps give two paired ratios r1, r2: their median is the midpoint, the
    # bootstrap CI and the p10-p90 are [min, max], and the ratio of the two models' medians
    # (means of two steps) lies between r1 and r2. All printed to 3 decimals.
    for base in ("dense", "llama3"):
        paired = re.search(rf"paired per-step ratio mot/{base}: median (\S+) \(95% CI (\S+)-(\S+)\) "
                           rf"p10-p90 (\S+)-(\S+)", out)
        assert paired, out
        median, lo, hi, p10, p90 = map(float, paired.groups())
        assert (lo, hi) == (p10, p90) and lo < hi, out
        assert abs(median - (lo + hi) / 2) <= 1.5e-3, out
        of_medians = re.search(rf"^mot/{base} step time ratio: (\S+)$", out, re.MULTILINE)
        assert of_medians and lo - 1e-3 <= float(of_medians.group(1)) <= hi + 1e-3, out
    mixes = re.search(r"over measured steps: .* \((\d+) distinct mixes\)", out)
    assert mixes and int(mixes.group(1)) == 2, out  # a count-specialised graph would recompile
    assert re.search(r"^compile: unique graphs 3, 0 compiled during the 2 measured steps "
                     r"\(recompiles\), graph breaks 0$", out, re.MULTILINE), out
    last_two = out.strip().splitlines()[-2:]
    assert last_two[0] == f"mot/llama3 step time ratio: {result['step_time_ratio']['llama3']:.3f}"
    assert last_two[1] == f"mot/dense step time ratio: {result['step_time_ratio']['dense']:.3f}"


@pytest.mark.slow
def test_benchmark_transfusion_smoke(tmp_path: Path) -> None:
    """`--transfusion`: MoT with diffusion layers vs its dense twin only (no Llama3: it has no
    patch layers), the ratio line under its own name; patch layers counted in the params."""
    out = subprocess.run(
        [sys.executable, "-m", "torchtitan_mot.benchmark", "--transfusion", "--dim", "64",
         "--n-layers", "2", "--n-heads", "2", "--seq-len", "96", "--batch", "2", "--vocab", "64",
         "--latent-shape", "4,8,8", "--steps", "2", "--warmup", "1", "--threads", "1",
         "--device", "cpu", "--json", str(tmp_path / "bench.json")],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    assert list(result["models"]) == ["mot(2)", "dense"], out
    assert list(result["paired_ratio"]) == ["dense"]
    assert result["settings"]["transfusion"] == {"latent_shape": [4, 8, 8], "patch_size": 2,
                                                 "diffusion_weight": 5.0}
    # dense twin: dim 64, 2 layers, vocab 64 = embedding + head + blocks + final norm + patch layers
    patch = (16 * 64 + 64) + (64 * 16 + 16) + (256 * 64 + 64) + (64 * 64 + 64)
    hidden = 256  # Llama3's FFN width of dim 64: 2/3 * 4 * 64, rounded up to multiple_of 256
    blocks = 2 * (4 * 64 * 64 + 3 * 64 * hidden + 2 * 64)
    assert result["models"]["dense"]["params"] == 2 * 64 * 64 + 64 + blocks + patch, out
    assert out.strip().splitlines()[-1] == (
        f"transfusion mot/dense step time ratio: {result['step_time_ratio']['dense']:.3f}")


def test_transfusion_batch_layout() -> None:
    """Every image is BOI, (H/p)(W/p) latent positions holding the BOI id, EOI, all of the image
    modality; no CE label at BOI and latent positions; patches, noise and t only at latents."""
    from types import SimpleNamespace

    import torch

    from torchtitan_mot.benchmark.step_time import make_transfusion_batch
    from torchtitan_mot.model.schedule import DiffusionSchedule

    a = SimpleNamespace(latent_shape="4,8,8", patch_size=2, seq_len=100, batch=3, vocab=50,
                        mix_jitter=0.2, device="cpu")
    gen = torch.Generator().manual_seed(0)
    tokens, labels, ids, diff, fractions = make_transfusion_batch(
        a, torch.tensor([0.5, 0.5]), gen, DiffusionSchedule(1000))
    boi, eoi, n = 48, 49, 16
    for row in range(3):
        images = diff["image_ids"][row]
        n_images = int(images.max()) + 1
        assert n_images >= 1
        for k in range(n_images):
            pos = (images == k).nonzero().flatten()
            assert pos.numel() == n and bool((pos.diff() == 1).all())
            first, last = int(pos[0]), int(pos[-1])
            assert tokens[row, first - 1] == boi and tokens[row, last + 1] == eoi
            assert bool((tokens[row, pos] == boi).all())
            assert bool((ids[row, first - 1 : last + 2] == 1).all())
        assert int((ids[row] == 1).sum()) == n_images * (n + 2)
        assert bool(((labels[row] == -100) == (tokens[row] == boi)).all())
        assert int((tokens[row] == boi).sum()) == n_images * (n + 1)
        text = tokens[row] < boi
        assert bool((labels[row, :-1][text[:-1]] == tokens[row, 1:][text[:-1]]).all())
    latent = diff["image_ids"] >= 0
    for key in ("patches", "noise"):
        assert bool((diff[key][~latent] == 0).all()) and bool((diff[key][latent] != 0).all())
    assert bool((diff["timesteps"][~latent] == 0).all())
    assert fractions[1] == pytest.approx(float((ids[0] == 1).float().mean()))


@pytest.mark.slow
def test_benchmark_moe_smoke(tmp_path: Path) -> None:
    """`--moe-modalities 0` adds the MoE-4x baseline and the hybrid at MoT's active FLOPs
    (top-1 of 4 experts of the dense hidden size: only the router's FLOPs on top), and prints
    the hybrid/mot and moe4x/dense ratios of the models' medians."""
    out = subprocess.run(
        [sys.executable, "-m", "torchtitan_mot.benchmark", "--dim", "64", "--n-layers", "1",
         "--n-heads", "2", "--seq-len", "32", "--batch", "2", "--vocab", "64",
         "--steps", "2", "--warmup", "1", "--threads", "1", "--device", "cpu", "--moe-modalities", "0",
         "--json", str(tmp_path / "bench.json")],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    models = result["models"]
    assert list(models) == ["mot(2)", "dense", "llama3", "moe4x", "hybrid"], out
    mot, dense = models["mot(2)"], models["dense"]
    # The hybrid adds 3 text experts of the modality FFN's size plus a router; MoE-4x the same on the dense twin.
    dim = result["settings"]["dim"]
    extra = models["hybrid"]["params"] - mot["params"]
    assert extra == models["moe4x"]["params"] - dense["params"] > 0
    router = 4 * dim  # one (4, dim) gate per layer (1 layer)
    assert (extra - router) % (3 * 3 * dim) == 0, extra  # 3 more experts of w1, w2, w3 (dim x hidden)
    for model, base in (("hybrid", mot), ("moe4x", dense)):
        assert base["flops_per_token"] <= models[model]["flops_per_token"] <= 1.01 * base["flops_per_token"]
    for pair, ratio in result["moe_step_time_ratio"].items():
        assert re.search(rf"^{re.escape(pair)} step time ratio: {ratio:.3f}$", out, re.MULTILINE), out
    assert set(result["moe_step_time_ratio"]) == {"hybrid/mot", "moe4x/dense"}
    assert result["moe_step_time_ratio"]["hybrid/mot"] == pytest.approx(
        models["hybrid"]["median_ms"] / mot["median_ms"])


def test_benchmark_refuses_compile_with_moe(capsys) -> None:
    from torchtitan_mot.benchmark.__main__ import parse_args

    with pytest.raises(SystemExit) as exit:
        parse_args(["--compile", "--moe-modalities", "0"])
    assert exit.value.code == 2 and "--compile with --moe-modalities" in capsys.readouterr().err
