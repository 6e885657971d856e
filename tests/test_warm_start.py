"""Warm start MoT from dense Llama3 (DCP and HuggingFace) against the dense model itself."""

import copy
import dataclasses
import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchtitan.models.llama3 import Transformer, TransformerModelArgs

import torchtitan_mot
from torchtitan_mot.model import MoTTransformer
from torchtitan_mot.model.state_dict_adapter import (
    MoTStateDictAdapter,
    untie_dense_state_dict,
    WarmStartError,
)

from helpers import make_norms_informative

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "warm_start.py"
CONFIG = REPO / "train_configs" / "debug_mot.toml"


def _mot_args(flavor: str, config: Path = CONFIG):
    """The flavor's args with the vocabulary size of `config` (tokenizer + codebooks)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import warm_start

    return warm_start.mot_target(config, flavor)[0]


def _config_3modality(tmp_path: Path) -> Path:
    """debug_mot.toml with a third (speech) modality."""
    text = CONFIG.read_text().replace('modalities = ["text", "image"]', 'modalities = ["text", "image", "speech"]')
    path = tmp_path / "mot3.toml"
    path.write_text(text.replace("codebook_sizes = [256]", "codebook_sizes = [256, 64]"))
    return path


def _dense_like(flavor: str, vocab_size: int) -> Transformer:
    """A dense torchtitan Llama3 with the flavor's block shapes, randomly initialised."""
    a = torchtitan_mot.mot_args[flavor]
    torch.manual_seed(0)
    llama = Transformer(
        TransformerModelArgs(
            dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
            vocab_size=vocab_size, rope_theta=a.rope_theta, max_seq_len=64,
        )
    )
    with torch.no_grad():
        llama.init_weights()
    make_norms_informative(llama)
    return llama.eval()


def _run_script(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _load_mot(path: Path, args) -> MoTTransformer:
    args = copy.deepcopy(args)
    args.max_seq_len = 64
    mot = MoTTransformer(args)
    sd = mot.state_dict()
    dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    mot.load_state_dict(sd)
    return mot.eval()


def _assert_same_logits(mot: MoTTransformer, llama: Transformer, n_mod: int) -> None:
    vocab = llama.vocab_size
    torch.manual_seed(1)
    tokens = torch.randint(0, vocab, (2, 48))
    with torch.no_grad():
        expected = llama(tokens)
        for ids in (torch.randint(0, n_mod, (2, 48)), torch.zeros(2, 48, dtype=torch.long),
                    torch.full((2, 48), n_mod - 1)):
            got = mot(tokens, modality_ids=ids)
            torch.testing.assert_close(got[..., :vocab], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flavor", ["debugmodel", "debugmodel_3modality"])
def test_dcp_warm_start_equals_dense(tmp_path: Path, flavor: str) -> None:
    """Dense vocab = text vocab < MoT vocab: new rows are added, old logits are exact."""
    config = _config_3modality(tmp_path) if flavor.endswith("3modality") else CONFIG
    args = _mot_args(flavor, config)
    text_vocab = 1024
    llama = _dense_like(flavor, text_vocab)
    # A full training checkpoint: model entries plus other states warm start must ignore.
    dcp.save({**llama.state_dict(), "train_state": {"step": torch.tensor(7)},
              "optimizer": {"state.output.weight.exp_avg": torch.ones(3)}},
             checkpoint_id=str(tmp_path / "dense"), no_dist=True)
    out = tmp_path / "mot"
    _run_script("--dense", str(tmp_path / "dense"), "--flavor", flavor,
                "--config", str(config), "--out", str(out))
    mot = _load_mot(out, args)
    _assert_same_logits(mot, llama, args.n_modalities)
    # New rows: near the mean dense row, distinct from each other.
    emb = mot.tok_embeddings.weight.detach()
    new = emb[text_vocab:]
    assert new.shape[0] == args.vocab_size - text_vocab
    mean = llama.tok_embeddings.weight.detach().mean(0)
    assert (new - mean).abs().max() < 0.05 * llama.tok_embeddings.weight.std()
    assert not torch.equal(new[0], new[1])


def test_idempotent_and_refuses_overwrite(tmp_path: Path) -> None:
    llama = _dense_like("debugmodel", 1000)
    dcp.save(llama.state_dict(), checkpoint_id=str(tmp_path / "dense"), no_dist=True)
    common = ["--dense", str(tmp_path / "dense"), "--flavor", "debugmodel", "--config", str(CONFIG)]
    _run_script(*common, "--out", str(tmp_path / "a"))
    _run_script(*common, "--out", str(tmp_path / "b"))
    _assert_same_checkpoint(tmp_path / "a", tmp_path / "b")

    refused = _run_script(*common, "--out", str(tmp_path / "a"), check=False)
    assert refused.returncode != 0 and "not empty; pass --force" in refused.stderr
    _run_script(*common, "--out", str(tmp_path / "a"), "--force")
    _assert_same_checkpoint(tmp_path / "a", tmp_path / "b")


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    """Byte-identical tensor files and identical tensor metadata (`.metadata` also records
    the checkpoint's path and a random save id, which legitimately differ)."""
    cmp = filecmp.dircmp(a, b)
    assert not cmp.left_only and not cmp.right_only
    data = [f for f in cmp.common_files if f != ".metadata"]
    assert data and filecmp.cmpfiles(a, b, data, shallow=False)[1:] == ([], [])
    meta = [dcp.FileSystemReader(str(p)).read_metadata().state_dict_metadata for p in (a, b)]
    assert meta[0] == meta[1]


def test_mismatch_errors_name_the_key() -> None:
    llama = _dense_like("debugmodel", 300)
    with torch.device("meta"):
        mot = MoTTransformer(dataclasses.replace(torchtitan_mot.mot_args["debugmodel"], vocab_size=300))
    target = mot.state_dict()
    dense = llama.state_dict()

    missing = dict(dense)
    del missing["layers.2.feed_forward.w3.weight"]
    with pytest.raises(WarmStartError, match=r"missing.*layers\.2\.feed_forward\.w3\.0\.weight"):
        untie_dense_state_dict(missing, target)

    extra = {**dense, "layers.6.attention.wq.weight": dense["layers.0.attention.wq.weight"]}
    with pytest.raises(WarmStartError, match=r"no MoT counterpart: layers\.6\.attention\.wq\.weight"):
        untie_dense_state_dict(extra, target)

    wrong = {**dense, "layers.1.attention.wk.weight": torch.zeros(3, 256)}
    with pytest.raises(WarmStartError, match=r"layers\.1\.attention\.wk\.0\.weight: MoT \[256, 256\] vs dense"):
        untie_dense_state_dict(wrong, target)

    bigger = {**dense, "output.weight": torch.zeros(301, 256)}  # the vocab cannot shrink
    with pytest.raises(WarmStartError, match=r"output\.weight: MoT \[300, 256\] vs dense output\.weight \[301, 256\]"):
        untie_dense_state_dict(bigger, target)


def _write_hf(llama: Transformer, args, folder: Path) -> None:
    """A HF Llama safetensors folder made by our adapter's to_hf from a 1-modality MoT."""
    from safetensors.torch import save_file

    dense_mot = MoTTransformer(dataclasses.replace(args, n_modalities=1))
    dense_mot.load_state_dict(untie_dense_state_dict(llama.state_dict(), dense_mot.state_dict()))
    hf = MoTStateDictAdapter(dense_mot.model_args, None).to_hf(dense_mot.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in hf and "lm_head.weight" in hf
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"))


def test_hf_round_trip_and_script(tmp_path: Path) -> None:
    args = dataclasses.replace(_mot_args("debugmodel"), max_seq_len=64)
    llama = _dense_like("debugmodel", args.vocab_size)
    _write_hf(llama, args, tmp_path / "hf")

    # 1) The adapter alone, as TorchTitan's `initial_load_in_hf` path uses it.
    from safetensors.torch import load_file

    mot = MoTTransformer(args)
    adapter = MoTStateDictAdapter(args, None)
    template = adapter.to_hf(mot.state_dict())
    hf_sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(template) == set(hf_sd)
    mot.load_state_dict(adapter.from_hf(hf_sd))
    _assert_same_logits(mot.eval(), llama, 2)
    # to_hf exports modality 0 and round-trips exactly.
    back = adapter.to_hf(mot.state_dict())
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)

    # 2) The script from the HF folder.
    _run_script("--dense", str(tmp_path / "hf"), "--flavor", "debugmodel",
                "--config", str(CONFIG), "--out", str(tmp_path / "mot"))
    _assert_same_logits(_load_mot(tmp_path / "mot", args), llama, 2)


def test_trainer_loads_warm_start(tmp_path: Path) -> None:
    """The real entry point accepts the script's output as --checkpoint.initial_load_path."""
    llama = _dense_like("debugmodel", 1000)
    dcp.save(llama.state_dict(), checkpoint_id=str(tmp_path / "dense"), no_dist=True)
    _run_script("--dense", str(tmp_path / "dense"), "--flavor", "debugmodel",
                "--config", str(CONFIG), "--out", str(tmp_path / "mot"))
    result = subprocess.run(
        [sys.executable, "-m", "torchtitan_mot.train", "--job.config_file", str(CONFIG),
         "--training.steps", "1", "--training.seq_len", "64", "--training.local_batch_size", "2",
         "--metrics.no-enable-tensorboard", "--job.dump_folder", str(tmp_path / "run"),
         "--checkpoint.enable", "--checkpoint.initial_load_path", str(tmp_path / "mot"),
         "--checkpoint.interval", "1000"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert f"Loading the checkpoint from {tmp_path / 'mot'}" in log


@pytest.mark.slow
def test_untie_subset_warm_start_trains_and_other_setting_is_refused(tmp_path: Path) -> None:
    """`--untie ffn` warm start feeds a `--mot.untie ffn` run (start-up summary names the
    setting); the same checkpoint is refused by full MoT, naming the missing copies."""
    llama = _dense_like("debugmodel", 1000)
    dcp.save(llama.state_dict(), checkpoint_id=str(tmp_path / "dense"), no_dist=True)
    _run_script("--dense", str(tmp_path / "dense"), "--flavor", "debugmodel",
                "--config", str(CONFIG), "--out", str(tmp_path / "mot"), "--untie", "ffn")

    def train(name: str, *flags: str) -> tuple[int, str]:
        result = subprocess.run(
            [sys.executable, "-m", "torchtitan_mot.train", "--job.config_file", str(CONFIG),
             "--training.steps", "1", "--training.seq_len", "64", "--training.local_batch_size", "2",
             "--metrics.no-enable-tensorboard", "--job.dump_folder", str(tmp_path / name),
             "--checkpoint.enable", "--checkpoint.initial_load_path", str(tmp_path / "mot"),
             "--checkpoint.interval", "1000", *flags],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )
        return result.returncode, result.stdout + result.stderr

    code, log = train("ffn", "--mot.untie", "ffn")
    assert code == 0, log[-3000:]
    assert "untied: ffn; params " in log
    assert f"Loading the checkpoint from {tmp_path / 'mot'}" in log
    code, log = train("full")
    assert code != 0
    assert "mot.untie setting" in log and "missing from the checkpoint: layers.0.attention.wk.1.weight" in log
