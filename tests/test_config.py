"""`load_job_config`, the one way an entry point gets a job config: built-in config names,
paths resolved against the config's repository, local dataset paths never sent to the Hub,
[mot] against meta.json with errors that name the flag, and the start-up memory refusal."""

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchtitan_mot import capacity
from torchtitan_mot.compat.cpu import enable_cpu_fallback
from torchtitan_mot.config import ConfigError, load_job_config
from torchtitan_mot.data.dataset import load_split
from torchtitan_mot.model.args import VOCAB_ATTRIBUTE

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3


def test_builtin_config_name_resolves_paths_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no assets/ here: the config's relative paths are the repo's
    cfg = load_job_config(["--job.config_file", "debug_mot.toml"])
    assert Path(cfg.job.config_file) == REPO / "train_configs" / "debug_mot.toml"
    assert Path(cfg.model.hf_assets_path) == REPO / "assets" / "tokenizer"
    assert Path(cfg.training.dataset_path) == REPO / "assets" / "demo" / "text_image"
    # modalities and codebook sizes are unset in debug_mot.toml: meta.json gives them
    assert cfg.mot.modalities == ["text", "image"] and cfg.mot.codebook_sizes == [256]
    assert getattr(cfg.mot, VOCAB_ATTRIBUTE).vocab_size == 1024 + 2 + 256
    with pytest.raises(ConfigError, match=r"--job.config_file nope.toml: no such file \(looked in .*nope.toml"
                                          r".*\); built-in configs: .*debug_mot.toml"):
        load_job_config(["--job.config_file", "nope.toml"])
    with pytest.raises(ConfigError, match=r"--model.hf_assets_path ./missing_tok: not found \(looked in "
                                          rf"{tmp_path}/missing_tok, {REPO}/missing_tok"):
        load_job_config(["--job.config_file", "debug_mot.toml", "--model.hf_assets_path", "./missing_tok"])


@pytest.mark.parametrize("path", ["data/mine", "./mine", "/nonexistent/mine"])
def test_missing_local_dataset_fails_at_once_without_the_hub(tmp_path: Path, monkeypatch, path: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # `data/mine` is local because `data/` is
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the Hub is not what makes it fast
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        load_job_config(["--job.config_file", "debug_mot.toml", "--training.dataset_path", path])
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "\n" not in message and f"--training.dataset_path {path}: no such folder" in message
    assert f"working directory {tmp_path}" in message
    # The loader itself (a dataset built without a job config) never asks the Hub either.
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=f"dataset path {path}: no such folder"):
        load_split(path, "train", False, ["text", "image"], [256])
    assert time.perf_counter() - start < 5


def test_unreachable_hub_name_says_so(monkeypatch) -> None:
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="someone-xyz/no-such-set: not a local folder and not reachable on the Hub"):
        load_split("someone-xyz/no-such-set", "train", False, ["text", "image"], [256])


def test_config_and_dataset_disagreeing_name_the_flag() -> None:
    demo = REPO / "assets" / "demo"
    base = ["--job.config_file", "debug_mot.toml"]
    with pytest.raises(ConfigError) as error:
        load_job_config([*base, "--mot.modalities", "text,image", "--mot.codebook_sizes", "1024"])
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(f"{demo / 'text_image' / 'meta.json'} declares codebook_sizes {{'image': 256}}")
    assert "pass --mot.codebook_sizes 256 " in str(error.value)
    with pytest.raises(ConfigError, match=r"declares modalities \['text', 'image', 'speech'\] but the config has "
                                          r"\[mot\].modalities = \['text', 'image'\]: leave \[mot\].modalities"):
        load_job_config([*base, "--training.dataset_path", str(demo / "text_image_speech"),
                         "--mot.modalities", "text,image", "--mot.codebook_sizes", "256"])


def test_flavor_too_big_for_this_machine_is_refused_before_allocating(monkeypatch) -> None:
    enable_cpu_fallback()  # the plan's meshes on "cpu" when there is no accelerator (as train.py does)
    monkeypatch.setattr(capacity, "available_bytes", lambda: (24 * GIB, "host RAM"))
    capacity.check_model_fits(load_job_config(["--job.config_file", "debug_mot.toml"]))  # 6M params fit
    big = load_job_config(["--job.config_file", "debug_mot.toml", "--model.flavor", "8B_2modality"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        capacity.check_model_fits(big)
    assert time.perf_counter() - start < 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss < GIB  # 14B params never allocated
    message = str(error.value)
    assert message.startswith("model.flavor 8B_2modality does not fit: its largest rank holds 13.")
    assert "GiB of parameters, gradients and AdamW state" in message
    assert "but host RAM is 24.0 GiB" in message and "check_plan" in message and "\n" not in message


def test_entry_point_prints_config_errors_as_one_line(tmp_path: Path) -> None:
    """A flavor no machine can hold (70B: ~2 TiB of model state) stops `train` at start-up."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "torchtitan_mot.train", "--job.config_file", "debug_mot.toml",
                          "--model.flavor", "70B_2modality"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert time.perf_counter() - start < 40, "refused only after a long start-up"
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "model.flavor 70B_2modality does not fit" in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
