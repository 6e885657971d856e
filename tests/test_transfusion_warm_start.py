"""Warm start of a Transfusion flavor from a dense Llama3 or a Chameleon-setting MoT checkpoint:
loaded weights equal the source's, the patch layers equal their own seeded init, and the
warm-started model trains through the real entry point."""

import math
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchtitan.models.llama3 import Transformer, TransformerModelArgs

from torchtitan_mot.model import MoTTransformer
from torchtitan_mot.model.diffusion import DiffusionLayers
from torchtitan_mot.model.state_dict_adapter import dense_key, WarmStartError
from torchtitan_mot.warm_start import mot_target, warm_start

from harness.trainer import REPO, run_trainer
from helpers import make_norms_informative

TF_CONFIG = REPO / "train_configs" / "debug_transfusion.toml"
MOT_CONFIG = REPO / "train_configs" / "debug_mot.toml"
DEMO = REPO / "assets" / "demo" / "text_image_latent"
TEXT_VOCAB = 1024
SEED = 3


def _random_mot(flavor: str, config: Path) -> dict[str, torch.Tensor]:
    """A randomly initialised MoT of `flavor` under `config` (a Chameleon-setting source)."""
    args = mot_target(config, flavor)[0]
    torch.manual_seed(0)
    model = MoTTransformer(args)
    with torch.no_grad():
        model.init_weights()
    make_norms_informative(model)
    return model.state_dict()


def _load(path: Path, flavor: str = "debugmodel_transfusion") -> dict[str, torch.Tensor]:
    """The warm-started checkpoint, loaded into the Transfusion model's state dict."""
    state = MoTTransformer(mot_target(TF_CONFIG, flavor)[0]).state_dict()
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state


def _assert_fresh_patch_layers(state: dict[str, torch.Tensor], flavor: str = "debugmodel_transfusion") -> None:
    torch.manual_seed(SEED)
    fresh = DiffusionLayers(mot_target(TF_CONFIG, flavor)[0])
    with torch.no_grad():
        fresh.init_weights()
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(state[f"diffusion.{key}"], value, rtol=0, atol=0)


def test_from_chameleon_mot(tmp_path: Path) -> None:
    source = _random_mot("debugmodel", MOT_CONFIG)
    dcp.save(source, checkpoint_id=str(tmp_path / "mot"), no_dist=True)
    warm_start(tmp_path / "mot", TF_CONFIG, "debugmodel_transfusion", tmp_path / "out", seed=SEED)
    state = _load(tmp_path / "out")
    for key, value in state.items():
        if key.startswith("diffusion."):
            continue
        if key in ("tok_embeddings.weight", "output.weight"):
            torch.testing.assert_close(value[:TEXT_VOCAB], source[key][:TEXT_VOCAB], rtol=0, atol=0)
            # BOI/EOI rows: initialised near the mean text row, not the Chameleon layout's rows
            assert value.shape[0] == TEXT_VOCAB + 2 < source[key].shape[0]
            mean = source[key][:TEXT_VOCAB].mean(0)
            assert (value[TEXT_VOCAB:] - mean).abs().max() < 0.05 * source[key][:TEXT_VOCAB].std()
        else:
            torch.testing.assert_close(value, source[key], rtol=0, atol=0)
    _assert_fresh_patch_layers(state)


def test_from_dense_llama(tmp_path: Path) -> None:
    args = mot_target(TF_CONFIG, "debugmodel_transfusion")[0]
    torch.manual_seed(0)
    llama = Transformer(TransformerModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                                             n_kv_heads=args.n_kv_heads, vocab_size=TEXT_VOCAB, max_seq_len=64))
    with torch.no_grad():
        llama.init_weights()
    make_norms_informative(llama)
    dense = llama.state_dict()
    dcp.save(dense, checkpoint_id=str(tmp_path / "dense"), no_dist=True)
    warm_start(tmp_path / "dense", TF_CONFIG, "debugmodel_transfusion", tmp_path / "out", seed=SEED)
    state = _load(tmp_path / "out")
    copies = 0
    for key, value in state.items():
        if key.startswith("diffusion."):
            continue
        src = dense[dense_key(key)[0]]
        copies += key.startswith("layers.")
        torch.testing.assert_close(value[: src.shape[0]], src, rtol=0, atol=0)
    assert copies > len([k for k in dense if k.startswith("layers.")])  # several modality copies
    _assert_fresh_patch_layers(state)


def test_mot_source_of_another_shape_is_refused(tmp_path: Path) -> None:
    """An MoT source whose blocks are untied differently names the keys it lacks."""
    source = _random_mot("debugmodel", MOT_CONFIG)
    source = {k: v for k, v in source.items() if ".feed_forward.w1.1." not in k}
    dcp.save(source, checkpoint_id=str(tmp_path / "mot"), no_dist=True)
    with pytest.raises(WarmStartError, match=r"missing in the MoT checkpoint: layers\.0\.feed_forward\.w1\.1\.weight"):
        warm_start(tmp_path / "mot", TF_CONFIG, "debugmodel_transfusion", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "meta.json").is_file(), reason="needs the latent demo")
def test_warm_started_transfusion_trains(tmp_path: Path) -> None:
    """The real entry point trains from the warm start: both losses logged and finite."""
    source = _random_mot("debugmodel", MOT_CONFIG)
    dcp.save(source, checkpoint_id=str(tmp_path / "mot"), no_dist=True)
    warm_start(tmp_path / "mot", TF_CONFIG, "debugmodel_transfusion", tmp_path / "out", seed=SEED)
    run = run_trainer([
        "--job.config_file", str(TF_CONFIG), "--job.dump_folder", str(tmp_path / "run"),
        "--training.steps", "3", "--training.seq_len", "128", "--training.local_batch_size", "2",
        "--metrics.log_freq", "1", "--debug.seed", "0",
        "--checkpoint.enable", "--checkpoint.initial_load_path", str(tmp_path / "out"),
        "--checkpoint.interval", "1000",
    ])
    text, image = run.scalars("loss/text"), run.scalars("loss/image")
    assert sorted(text) == sorted(image) == [1, 2, 3]
    assert all(math.isfinite(v) for v in (*text.values(), *image.values()))
