"""End-to-end runs of `python -m torchtitan_mot.train` (and torchrun) on CPU.

Each test trains the MoT `debugmodel` of `train_configs/debug_mot.toml` for a few steps on
segments of the bundled text+image demo data and reads the logged steps back from
TensorBoard (`harness.trainer`).
"""

import json
import re
from pathlib import Path

import pytest
from harness.data import repeated_dataset
from harness.trainer import REPO, run_trainer, seed_checkpoint

from torchtitan_mot.data.dataset import MultimodalDataset
from torchtitan_mot.data.tokenizer import MultimodalTokenizer

DEMO = REPO / "assets" / "demo" / "text_image"
SEQ_LEN, STEPS, GLOBAL_BATCH = 64, 6, 4


def one_window_rows(demo_jsonl: Path, n: int) -> list[dict]:
    """`n` rows of the segments of `demo_jsonl` (the demo's jsonl form), each exactly one
    training window once encoded (`SEQ_LEN + 1` tokens: `[bos] segments [eos]`, the last an
    image segment cut to fit)."""
    tok = MultimodalTokenizer(str(REPO / "assets" / "tokenizer"), ["text", "image"], [256])
    demo = MultimodalDataset(str(DEMO), "train", tok, seq_len=SEQ_LEN)
    length = SEQ_LEN + 1

    def n_tokens(segments: list[dict]) -> int:
        return len(demo.encode_sample(0, {"segments": segments}))

    markers = n_tokens([{"modality": "image", "tokens": [0]}]) - 3  # around one token, bos/eos aside
    segments = (seg for line in (demo_jsonl / "train.jsonl").read_text().splitlines()
                for seg in json.loads(line)["segments"])
    rows = []
    while len(rows) < n:
        row: list[dict] = []
        for seg in segments:
            if n_tokens([*row, seg]) + markers + 1 > length:
                break
            row.append(seg)
        row.append({"modality": "image", "tokens": list(range(length - n_tokens(row) - markers))})
        assert n_tokens(row) == length
        rows.append({"segments": row})
    return rows


def write_corpus(demo_jsonl: Path, root: Path, rows: list[dict], dp: int) -> Path:
    """`rows` as a dataset for `dp` data-parallel ranks of `GLOBAL_BATCH // dp` rows a step.

    Ranks read contiguous shards of the rows and every row is one window, so the rows are
    ordered to give rank r, at every step, the r-th slice of what a single process with
    `GLOBAL_BATCH` rows reads: the global batches are the same, each rank's data differs.
    """
    batch = GLOBAL_BATCH // dp
    ordered = [rows[step * GLOBAL_BATCH + rank * batch + i]
               for rank in range(dp) for step in range(STEPS) for i in range(batch)]
    root.mkdir(parents=True)
    (root / "meta.json").write_text((demo_jsonl / "meta.json").read_text())
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ordered))
    return root


def base_args(data_dir: Path, dump: Path, steps: int, local_batch: int = GLOBAL_BATCH) -> list[str]:
    return [
        "--job.config_file", str(REPO / "train_configs" / "debug_mot.toml"),
        "--training.dataset_path", str(data_dir),
        "--training.seq_len", str(SEQ_LEN),
        "--training.local_batch_size", str(local_batch),
        "--training.steps", str(steps),
        "--training.mixed_precision_param", "float32",
        "--lr_scheduler.warmup_steps", "2",
        "--metrics.log_freq", "1",
        "--debug.seed", "0",
        "--debug.deterministic",
        "--job.dump_folder", str(dump),
    ]


def run_train(
    args: list[str], nproc: int = 1, log_rank: int = 0, timeout: int = 600
) -> dict[int, tuple[float, float]]:
    """Run the entry point; return {step: (loss, grad_norm)} as logged (TensorBoard) by the
    metrics rank (`log_rank`'s console output is the one shown on failure)."""
    return run_trainer(args, nproc, log_rank, timeout=timeout).steps()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[int, Path]:
    """data-parallel degree -> dataset (the same rows, ordered for that many ranks)."""
    root = tmp_path_factory.mktemp("assets")
    demo_jsonl = repeated_dataset(DEMO, root / "demo", jsonl=True)
    rows = one_window_rows(demo_jsonl, STEPS * GLOBAL_BATCH)
    return {dp: write_corpus(demo_jsonl, root / f"dp{dp}", rows, dp) for dp in (1, 2, 4)}


@pytest.fixture(scope="module")
def seed(corpora, tmp_path_factory) -> list[str]:
    """Arguments that start a run from one shared seed checkpoint (same init for every layout)."""
    return seed_checkpoint(base_args(corpora[1], tmp_path_factory.mktemp("seed"), STEPS))


@pytest.fixture(scope="module")
def single(corpora, seed, tmp_path_factory) -> dict[int, tuple[float, float]]:
    """Reference trajectory: one process, the whole global batch."""
    return run_train([*base_args(corpora[1], tmp_path_factory.mktemp("single"), STEPS), *seed])


@pytest.mark.slow
def test_single_process_loss_falls(single):
    assert sorted(single) == list(range(1, STEPS + 1))
    assert single[STEPS][0] < single[1][0] - 0.5


FSDP2 = ["--parallelism.data_parallel_shard_degree", "2"]
HSDP2X2 = ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "2"]
DDP2 = ["--parallelism.data_parallel_shard_degree", "1", "--parallelism.data_parallel_replicate_degree", "2"]
TP2 = ["--parallelism.tensor_parallel_degree", "2"]
PP2 = ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_microbatch_size", "1"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallel, nproc, log_rank, dp",
    [
        pytest.param(FSDP2, 2, 0, 2, id="fsdp2"),
        pytest.param(DDP2, 2, 0, 2, id="ddp2"),
        pytest.param(HSDP2X2, 4, 0, 4, id="hsdp2x2"),
        pytest.param(TP2, 2, 0, 1, id="tp2"),
        pytest.param(PP2, 2, 1, 1, id="pp2"),
        pytest.param(FSDP2 + TP2, 4, 0, 2, id="fsdp2xtp2"),
        pytest.param(["--compile.enable"], 1, 0, 1, id="compile"),
    ],
)
def test_parallel_layouts_match_single_process(
    parallel, nproc, log_rank, dp, corpora, seed, single, tmp_path_factory
):
    """Every layout must reproduce the single-process losses AND grad norms, to the printed
    digits (loss 5 decimals, grad norm 4: one unit in the last digit for rounding).

    Each data-parallel rank reads its own rows (`write_corpus`), which together are the single
    process's batch: a gradient reduction that dropped or double-counted a rank would show.
    The grad norm pins the gradient scale, which Adam would otherwise hide: it checks the gloo
    SUM reduce-scatter (FSDP), the SUM comm hook (DDP: stock 0.2.2 logs half the norm) and the
    pre-backward loss scaling (PP: stock 0.2.2 logs 128x).
    """
    dump = tmp_path_factory.mktemp("layout")
    got = run_train([*base_args(corpora[dp], dump, STEPS, GLOBAL_BATCH // dp), *seed, *parallel],
                    nproc=nproc, log_rank=log_rank)
    assert sorted(got) == sorted(single)
    for step, (loss, grad_norm) in single.items():
        assert got[step][0] == pytest.approx(loss, abs=1.5e-5), step
        assert got[step][1] == pytest.approx(grad_norm, abs=1.5e-4), step


@pytest.mark.slow
def test_mot_debug_config_logs_per_modality_loss(tmp_path):
    """The shipped debug config trains 20 steps through the entry point: the loss falls and
    `loss/<modality>` is logged every step."""
    run = run_trainer(
        [
            "--job.config_file", str(REPO / "train_configs" / "debug_mot.toml"),
            "--training.steps", "20",
            "--training.local_batch_size", "2",
            "--training.seq_len", "128",
            "--job.dump_folder", str(tmp_path),
        ]
    )
    text, image = run.scalars("loss/text"), run.scalars("loss/image")
    assert sorted(text) == sorted(image) == list(range(1, 21)), run.log[-3000:]
    losses = {step: loss for step, (loss, _) in run.steps().items()}
    assert losses[20] < losses[1] - 2.0, losses
    assert text[20] < text[1]
    assert image[20] < image[1]
    assert "without native bf16 matmuls" not in run.log  # float32 config: no emulated-bf16 warning


@pytest.mark.slow
def test_readme_demo_losses(tmp_path):
    """The README's demo figures: `python -m torchtitan_mot.train --job.config_file
    train_configs/debug_mot.toml` (50 steps, seed 0; about a minute) logs the quoted total and
    per-modality losses at steps 1 and 50, to the quoted 2 decimals."""
    readme = (REPO / "README.md").read_text()
    quoted = re.search(r"trains (\d+) steps of `train_configs/debug_mot.toml`.*?loss (\S+) -> (\S+), "
                       r"text (\S+) -> (\S+), image (\S+) -> (\S+);", readme, re.S)
    assert quoted, "the README's demo sentence moved"
    steps = int(quoted.group(1))
    run = run_trainer(["--job.config_file", str(REPO / "train_configs" / "debug_mot.toml"),
                       "--job.dump_folder", str(tmp_path)])
    losses = {step: loss for step, (loss, _) in run.steps().items()}
    text, image = run.scalars("loss/text"), run.scalars("loss/image")
    assert max(losses) == steps, sorted(losses)
    got = [losses[1], losses[steps], text[1], text[steps], image[1], image[steps]]
    assert [f"{v:.2f}" for v in got] == list(quoted.groups()[1:]), (got, quoted.groups())


def test_modality_losses_skip_modalities_without_tokens():
    """mean = sum / count per modality; a modality with no tokens is left out, not NaN."""
    import torch

    from torchtitan_mot.trainer.loss import ModalityLossStats
    from torchtitan_mot.trainer.metrics import MoTMetricsProcessor

    stats = ModalityLossStats(["text", "image", "speech"])
    stats.add(torch.tensor([6.0, 0.0, 3.0]), torch.tensor([3.0, 0.0, 2.0]))

    class NoMeshes:
        def get_optional_mesh(self, name: str) -> None:
            return None

    processor = MoTMetricsProcessor.__new__(MoTMetricsProcessor)
    processor.parallel_dims, processor.loss_stats = NoMeshes(), stats
    assert processor.modality_losses() == {"text": 2.0, "speech": 1.5}
