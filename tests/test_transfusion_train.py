"""The Transfusion debug config end to end through `python -m torchtitan_mot.train` on the
bundled latent demo: both losses logged; tensor parallel, pipeline parallel, compile and
activation checkpointing (full, op-selective) reproducing one eager process from one seed checkpoint (dp = 1, so every layout reads the
same batches); FSDP 2 reproducing it on a two-row corpus; exact resume;
`python -m torchtitan_mot.generate` on the seed checkpoint writing a PNG grid."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness.data import dataset_of_rows, dataset_rows
from harness.resume import check_exact_resume
from harness.trainer import REPO, run_trainer, seed_checkpoint, trainer_env

from torchtitan_mot.data.dataset import MultimodalDataset
from torchtitan_mot.data.latents import DiffusionWindows
from torchtitan_mot.data.tokenizer import MultimodalTokenizer

DEMO = REPO / "assets" / "demo" / "text_image_latent"
STEPS = 3

CONFIG = REPO / "train_configs" / "debug_transfusion.toml"

pytestmark = pytest.mark.slow


def _args(dump: Path, *extra: str) -> list[str]:
    return [
        "--job.config_file", str(CONFIG),
        "--training.seq_len", "128", "--training.local_batch_size", "2",
        "--training.steps", str(STEPS), "--training.mixed_precision_param", "float32",
        "--metrics.log_freq", "1", "--debug.seed", "0", "--debug.deterministic",
        "--job.dump_folder", str(dump), *extra,
    ]


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> list[str]:
    return seed_checkpoint(_args(tmp_path_factory.mktemp("seed")))


@pytest.fixture(scope="module")
def single(seed, tmp_path_factory):
    return run_trainer(_args(tmp_path_factory.mktemp("single"), *seed))


def test_text_and_image_losses_are_logged(single) -> None:
    text, image = single.scalars("loss/text"), single.scalars("loss/image")
    assert sorted(text) == sorted(image) == list(range(1, STEPS + 1))
    assert 0.0 < image[1] < 5.0  # eps-MSE of a fresh model: about the noise's variance


PP2 = ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_microbatch_size", "1"]


@pytest.mark.parametrize("extra, nproc, log_rank", [
    pytest.param(["--parallelism.tensor_parallel_degree", "2"], 2, 0, id="tp2"),
    # 2 stages x 2 microbatches (1F1B): image inputs to every stage, the packed loss target
    # split per microbatch, the loss normalised inside the schedule; logged by the last stage.
    pytest.param(PP2, 2, 1, id="pp2"),
    pytest.param(["--compile.enable"], 1, 0, id="compile"),
    # recompute of the patch layers, the timestep embedding and the intra-image mask's attention
    pytest.param(["--activation_checkpoint.mode", "full"], 1, 0, id="ac_full"),
    pytest.param(["--activation_checkpoint.mode", "selective",
                  "--activation_checkpoint.selective_ac_option", "op"], 1, 0, id="ac_selective_op"),
])
def test_layout_matches_single_process(extra, nproc, log_rank, seed, single, tmp_path_factory) -> None:
    run = run_trainer(_args(tmp_path_factory.mktemp("layout"), *seed, *extra), nproc, log_rank)
    if "--activation_checkpoint.mode" in extra:
        mode = extra[extra.index("--activation_checkpoint.mode") + 1]
        assert f"Applied {mode} activation checkpointing" in run.log
    _assert_same_steps(run, single)


def _assert_same_steps(run, reference) -> None:
    """Loss and grad norm (to the printed digits) and both per-modality losses equal."""
    got = run.steps()
    assert sorted(got) == list(range(1, STEPS + 1))
    for name in ("loss/text", "loss/image"):
        assert run.scalars(name) == pytest.approx(reference.scalars(name), abs=1.5e-5), name
    for step, (loss, grad_norm) in reference.steps().items():
        assert got[step][0] == pytest.approx(loss, abs=1.5e-5), step
        assert got[step][1] == pytest.approx(grad_norm, abs=1.5e-4), step


def _two_equal_rows(root: Path) -> tuple[Path, int]:
    """(dataset of two demo rows of the same encoded length L, L - 1): at seq_len L - 1 each
    row is exactly one window, so an FSDP 2 rank with one row a step reads, at every step
    (every epoch), half of what one process with both rows reads; the rows keep their
    indices, so their noise and t (seeded by row index and epoch) are the same in both."""
    tok = MultimodalTokenizer(str(REPO / "assets" / "tokenizer"), ["text", "image"], [0])
    _, height, width = json.loads((DEMO / "meta.json").read_text())["latents"]["image"]["shape"]
    patches = (height // 2) * (width // 2) + 2  # 2x2 patches, BOI and EOI
    by_length: dict[int, int] = {}
    for i, row in enumerate(dataset_rows(DEMO, "train")[:100]):
        (caption,) = [seg["text"] for seg in row["segments"] if seg["modality"] == "text"]
        n = 2 + len(tok.encode_segment("text", text=caption)) + patches  # + bos, eos
        if n % 2 == 0:  # the trainer wants an even seq_len (n - 1) under FSDP
            continue
        if n in by_length:
            root = dataset_of_rows(DEMO, root, [by_length[n], i])
            windows = MultimodalDataset(str(root), "train", tok, n - 1,
                                        diffusion=DiffusionWindows(("image",), 1000, 2))
            (first, _), (second, _) = [w for w, _ in zip(windows, range(2))]
            assert first["input"][0] == second["input"][0] == tok.bos_id  # one row, one window
            return root, n - 1
        by_length[n] = i
    raise AssertionError("no two demo rows of one length")


def test_fsdp2_matches_single_process(seed, tmp_path_factory) -> None:
    data, seq_len = _two_equal_rows(tmp_path_factory.mktemp("rows"))

    def run(nproc: int, batch: int, *extra: str) -> dict[int, tuple[float, float]]:
        return run_trainer(_args(tmp_path_factory.mktemp("fsdp"), *seed, "--training.dataset_path", str(data),
                                 "--training.seq_len", str(seq_len), "--training.local_batch_size", str(batch),
                                 *extra), nproc).steps()

    single = run(1, 2)
    got = run(2, 1, "--parallelism.data_parallel_shard_degree", "2")
    assert sorted(got) == sorted(single) == list(range(1, STEPS + 1))
    for step, (loss, grad_norm) in single.items():
        assert got[step][0] == pytest.approx(loss, abs=1.5e-5), step
        assert got[step][1] == pytest.approx(grad_norm, abs=1.5e-4), step


def test_exact_resume(tmp_path: Path) -> None:
    check_exact_resume(tmp_path, 1, [], config=CONFIG)


def test_generate_writes_a_png_grid(seed, tmp_path: Path) -> None:
    """The command line on the (random-weights) seed checkpoint: 2 prompts x 3 samples."""
    from PIL import Image

    out = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, "-m", "torchtitan_mot.generate", "--checkpoint", seed[2], "--config", str(CONFIG),
         "--prompt", "a handwritten digit seven", "--prompt", "handwritten 3", "--samples", "3",
         "--steps", "4", "--out", str(out)],
        cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 images from" in result.stdout and "ddpm, 4 steps" in result.stdout, result.stdout
    width, height = Image.open(out).size
    # save_png_grid puts up to 10 images in a row (1.2 x 1.4 inches each): six in one row
    assert width / height == pytest.approx(6 * 1.2 / 1.4, rel=0.02), (width, height)
