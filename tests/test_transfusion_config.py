"""The Transfusion settings at start-up: latent shapes from meta.json into the model args, and
each disagreement between flavor, [mot] and dataset a named error."""

import json
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from helpers import TINY, TINY_TRANSFUSION

from torchtitan_mot import build_model_args
from torchtitan_mot.config import ConfigError, load_job_config
from torchtitan_mot.model import MoTModelArgs, MoTTransformer
from torchtitan_mot.model.args import LATENTS_ATTRIBUTE
from torchtitan_mot.trainer.checkpoint_check import check_checkpoint_matches, CheckpointMismatchError

REPO = Path(__file__).resolve().parents[1]


def _latent_dataset(root: Path, shape: list[int]) -> Path:
    """A folder with just the meta.json of a latent dataset (the contract's fields)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(json.dumps({
        "modalities": ["text", "image"],
        "codebook_sizes": {},
        "latents": {"image": {"shape": shape, "dtype": "float16", "encoder": {"name": "pixels"}}},
    }))
    return root


def _load(data: Path, *extra: str, config: str = "debug_transfusion.toml"):
    return load_job_config(["--job.config_file", config, "--training.dataset_path", str(data), *extra])


def test_latent_shape_reaches_the_model_args(tmp_path: Path) -> None:
    job = _load(_latent_dataset(tmp_path / "d", [4, 8, 8]))
    assert getattr(job.mot, LATENTS_ATTRIBUTE) == {"image": (4, 8, 8)}
    args = build_model_args(job)
    assert (args.diffusion, args.diffusion_modality, args.patch_dim) == (True, 1, 4 * 2 * 2)
    dense = build_model_args(_load(tmp_path / "d", "--model.flavor", "debugmodel_transfusion_dense"))
    assert dense.n_modalities == 1 and dense.patch_dim == 16


def test_latent_dataset_without_diffusion_settings_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mot.diffusion_modalities"):
        _load(_latent_dataset(tmp_path / "d", [4, 8, 8]), config="debug_mot.toml")


def test_diffusion_settings_with_a_discrete_dataset_are_refused() -> None:
    with pytest.raises(ConfigError, match="codebook_sizes"):
        _load(REPO / "assets" / "demo" / "text_image")
    with pytest.raises(ConfigError, match="mot.diffusion_modalities"):
        _load(REPO / "assets" / "demo" / "text_image", config="debug_mot.toml",
              *["--mot.diffusion_modalities", "image"])


def test_flavor_without_diffusion_layers_is_refused(tmp_path: Path) -> None:
    job = _load(_latent_dataset(tmp_path / "d", [4, 8, 8]), "--model.flavor", "debugmodel")
    with pytest.raises(ValueError, match="model.flavor 'debugmodel' has no diffusion layers"):
        build_model_args(job)


def test_patch_size_must_divide_the_latent(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mot.diffusion_patch_size"):  # at load or in the args
        build_model_args(
            _load(_latent_dataset(tmp_path / "d", [4, 8, 8]), "--mot.diffusion_patch_size", "3")
        )


@pytest.mark.parametrize("flag", ["context_parallel_degree"])
def test_unsupported_parallelisms_are_refused_by_name(tmp_path: Path, flag: str) -> None:
    with pytest.raises(ConfigError, match=f"--parallelism.{flag} = 2"):
        _load(_latent_dataset(tmp_path / "d", [4, 8, 8]), f"--parallelism.{flag}", "2")


def test_bad_latent_shape_names_the_file(tmp_path: Path) -> None:
    data = _latent_dataset(tmp_path / "d", [4, 8])
    with pytest.raises(ConfigError, match=r"meta.json: latents.image.shape"):
        _load(data)


def test_checkpoint_check_knows_the_diffusion_layers(tmp_path: Path) -> None:
    """A checkpoint of a Transfusion model fits that model (its diffusion.* keys count as
    model keys), and not the same model without them."""
    model = MoTTransformer(MoTModelArgs(**TINY_TRANSFUSION))
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    check_checkpoint_matches(str(tmp_path / "ckpt"), model.state_dict())
    plain = MoTTransformer(MoTModelArgs(**TINY))
    with pytest.raises(CheckpointMismatchError, match="diffusion.patch_in"):
        check_checkpoint_matches(str(tmp_path / "ckpt"), plain.state_dict())
