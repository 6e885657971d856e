"""A non-editable install (wheel built from this tree, installed into a temporary directory)
prepares a dataset and loads it from a working directory outside the repository: nothing is
read relative to the package source (codebooks come from the dataset, the text tokenizer from
an explicit path). And it trains a built-in config by name from an empty directory, with the
configs, demo tokenizer and demo data it ships."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import make_image_folder

REPO = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent('''
    import sys
    from pathlib import Path
    import numpy as np
    import torchtitan_mot
    from torchtitan_mot.config import load_job_config
    from torchtitan_mot.data import build_mot_dataloader, build_mot_tokenizer
    from torchtitan_mot.data.prepare import load_tokenizer

    installed, dataset, tokenizer = (Path(a) for a in sys.argv[1:4])
    assert Path(torchtitan_mot.__file__).is_relative_to(installed), torchtitan_mot.__file__
    cfg = load_job_config(["--model.hf_assets_path", str(tokenizer), "--training.dataset_path", str(dataset),
        "--training.seq_len", "32", "--training.local_batch_size", "2"])
    x, y = next(iter(build_mot_dataloader(1, 0, build_mot_tokenizer(cfg), cfg)))
    assert cfg.mot.codebook_sizes == [32] and x["input"].shape == (2, 32)
    assert load_tokenizer(dataset, "image").decode(np.zeros(16, dtype=np.int64)).shape == (16, 16, 3)
    print("ok", torchtitan_mot.__file__)
''')


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This tree installed non-editably into a temporary site folder."""
    target = tmp_path_factory.mktemp("installed") / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True, timeout=600)
    assert not (target / "assets").exists() and not (target / "train_configs").exists()
    return target


@pytest.mark.slow
def test_non_editable_install_reads_nothing_from_source(tmp_path: Path, installed: Path) -> None:
    target = installed
    images, captions = make_image_folder(tmp_path / "raw", 10)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    subprocess.run([sys.executable, "-m", "torchtitan_mot.data.prepare", "--images", str(images), "--captions",
                    str(captions), "--out", "ds", "--image-size", "16", "--image-codebook-size", "32",
                    "--validation-fraction", "0.2", "--no-progress"],
                   cwd=work, env=env, check=True, capture_output=True, timeout=600)
    assert json.loads((work / "ds" / "meta.json").read_text())["codebook_sizes"] == {"image": 32}
    out = subprocess.run([sys.executable, "-c", CHECK, str(target), str(work / "ds"), str(REPO / "assets" / "tokenizer")],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]


@pytest.mark.slow
def test_installed_package_trains_a_builtin_config_from_an_empty_directory(tmp_path: Path, installed: Path) -> None:
    """README: `python -m torchtitan_mot.train --job.config_file debug_mot.toml` after `pip install`."""
    env = {**os.environ, "PYTHONPATH": str(installed)}
    out = subprocess.run([sys.executable, "-m", "torchtitan_mot.train", "--job.config_file", "debug_mot.toml",
                          "--training.steps", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    shipped = installed / "torchtitan_mot" / "_shipped"
    assert f"text tokenizer: {shipped / 'assets' / 'tokenizer'} (1,024 text ids" in log, log[-3000:]
    assert re.search(r"step:\s+2\s+\S*loss:", log), log[-3000:]
    assert not (shipped / "outputs").exists() and (tmp_path / "outputs").is_dir()  # writes go to the cwd
