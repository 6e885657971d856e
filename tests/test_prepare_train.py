"""From raw files to training: `python -m torchtitan_mot.data.prepare` on generated PNGs
(various sizes, grey and RGB) + captions + text documents, then `debug_mot` trains on the
result with validation and resumes exactly (harness.resume's check), with [mot].modalities and
codebook_sizes unset so they come from the dataset's meta.json. The same for a tiny audio set."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from harness.resume import check_exact_resume
from harness.trainer import CONFIG
from helpers import make_audio_folder, make_image_folder, make_text_docs

from torchtitan_mot.run_metrics import read_scalars

REPO = Path(__file__).resolve().parents[1]


def run_prepare(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "torchtitan_mot.data.prepare", "--no-progress", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def config_without_modalities(tmp_path: Path) -> Path:
    """debug_mot.toml minus [mot].modalities / codebook_sizes."""
    text = CONFIG.read_text()
    text = re.sub(r"(?m)^(modalities|codebook_sizes) = .*\n", "", text)
    assert "codebook_sizes" not in text
    path = tmp_path / "debug_mot_from_meta.toml"
    path.write_text(text)
    return path


def data_args(dataset: Path) -> list[str]:
    return ["--training.dataset_path", str(dataset), "--validation.dataset_path", str(dataset),
            "--validation.enable", "--validation.freq", "5", "--validation.steps", "2",
            "--validation.seq_len", "64", "--validation.local_batch_size", "2"]


@pytest.mark.slow
def test_images_prepare_train_validate_resume(tmp_path: Path) -> None:
    images, captions = make_image_folder(tmp_path / "raw", 60)
    docs = make_text_docs(tmp_path / "raw" / "docs.jsonl", 20)
    dataset = tmp_path / "dataset"
    out = run_prepare("--images", str(images), "--captions", str(captions), "--text-docs", str(docs),
                      "--out", str(dataset), "--image-size", "16", "--image-codebook-size", "64",
                      "--validation-fraction", "0.2", "--shard-rows", "20", "--row-group-rows", "5")
    assert "wrote" in out
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["codebook_sizes"] == {"image": 64} and len(meta["files"]["train"]) == 4

    check_exact_resume(tmp_path, 1, data_args(dataset), config=config_without_modalities(tmp_path))
    val = read_scalars(tmp_path / "straight", "validation_metrics/loss")
    assert sorted(val) == [1, 5, 10] and val[10] < val[1], val  # validation also runs at step 1


@pytest.mark.slow
def test_audio_prepare_train_validate(tmp_path: Path) -> None:
    audio, transcripts = make_audio_folder(tmp_path / "raw", 30)
    dataset = tmp_path / "dataset"
    run_prepare("--audio", str(audio), "--transcripts", str(transcripts), "--out", str(dataset),
                "--audio-codebook-size", "32", "--sample-rate", "8000", "--n-fft", "256", "--hop-length", "128",
                "--validation-fraction", "0.2", "--num-workers", "2")
    assert json.loads((dataset / "meta.json").read_text())["modalities"] == ["text", "speech"]

    check_exact_resume(tmp_path, 1, data_args(dataset), config=config_without_modalities(tmp_path))


@pytest.mark.slow
def test_readme_own_data_recipe_runs_as_written(tmp_path: Path) -> None:
    """README "Data": prepare with its defaults (1,024 image codes), then train debug_mot.toml
    on the result with no flag but the dataset (and a 2-step limit): the config takes the
    modalities and codebook sizes from meta.json, and both tools name the text tokenizer."""
    images, captions = make_image_folder(tmp_path / "raw", 12)
    prepared = subprocess.run([sys.executable, "-m", "torchtitan_mot.data.prepare", "--images", str(images),
                               "--captions", str(captions), "--out", "data/mine"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert json.loads((tmp_path / "data" / "mine" / "meta.json").read_text())["codebook_sizes"] == {"image": 1024}
    assert "encoded at training time by the config's --model.hf_assets_path" in prepared.stdout
    trained = subprocess.run([sys.executable, "-m", "torchtitan_mot.train", "--job.config_file",
                              "train_configs/debug_mot.toml", "--training.dataset_path", "data/mine",
                              "--checkpoint.enable", "--training.steps", "2"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
    log = trained.stdout + trained.stderr
    assert trained.returncode == 0, log[-3000:]
    assert re.search(r"step:\s+2\s+\S*loss:", log), log[-3000:]
    assert f"text tokenizer: {REPO / 'assets' / 'tokenizer'} (1,024 text ids; unified vocabulary 2,050 ids)" in log
    assert re.search(r"WARNING - \S+/data/mine is encoded with the bundled demo text tokenizer .*"
                     r"pass --model.hf_assets_path", log), log[-3000:]
    # README's next line: the checkpoint (trained on 1,024 image codes, not the config's demo
    # data) generates a grid decoded by the dataset's own image tokenizer.
    generated = subprocess.run([sys.executable, "-m", "torchtitan_mot.generate", "--checkpoint", "outputs/debug_mot",
                                "--config", "train_configs/debug_mot.toml", "--dataset", "data/mine",
                                "--prompt", "picture 1, two tones", "--samples", "2", "--out", "grid.png"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert "2 images from outputs/debug_mot/checkpoint/step-2" in generated.stdout, generated.stdout
    assert Image.open(tmp_path / "grid.png").size[0] > 0
