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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torchtitan.models.llama3 import Transformer, TransformerModelArgs

import torchtitan_mot
from torchtitan_mot.model import MoTModelArgs, MoTTransformer
from torchtitan_mot.model.state_dict_adapter import (
    MoTStateDictAdapter,
    untie_dense_state_dict,
    WarmStartError,
)
from torchtitan_mot.run_metrics import read_scalars
from torchtitan_mot.warm_start import mot_target, warm_start

from helpers import hf_llama_state_dict, make_norms_informative
from harness.trainer import run_trainer, small_args

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "train_configs" / "debug_mot.toml"


def _mot_args(flavor: str, config: Path = CONFIG) -> MoTModelArgs:
    """The flavor's args with the vocabulary size of `config` (tokenizer + codebooks)."""
    return mot_target(config, flavor)[0]


def _config_3modality(tmp_path: Path) -> Path:
    """debug_mot.toml with a third (speech) modality."""
    text = CONFIG.read_text().replace("[mot]\n", '[mot]\nmodalities = ["text", "image", "speech"]\n'
                                      "codebook_sizes = [256, 64]\n")
    assert "codebook_sizes = [256, 64]" in text
    path = tmp_path / "mot3.toml"
    path.write_text(text)
    return path


def _dense_like(flavor: str | MoTModelArgs, vocab_size: int) -> Transformer:
    """A dense torchtitan Llama3 with the flavor's (or args') block shapes, randomly initialised."""
    a = torchtitan_mot.mot_args[flavor] if isinstance(flavor, str) else flavor
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
    """`python -m torchtitan_mot.warm_start ARGS`."""
    result = subprocess.run([sys.executable, "-m", "torchtitan_mot.warm_start", *args], cwd=REPO,
                            capture_output=True, text=True)
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_hf_adapter_against_hand_built_hf_tensors() -> None:
    """HF tensors made by hand (grouped-query attention, so k has its own head count) load
    into an MoT that equals the dense model; `to_hf` gives exactly those tensors back."""
    args = dataclasses.replace(_mot_args("debugmodel"), n_kv_heads=8, max_seq_len=64)
    llama = _dense_like(args, args.vocab_size)
    hf_sd = hf_llama_state_dict(llama)
    mot = MoTTransformer(args)
    adapter = MoTStateDictAdapter(args, None)
    mot.load_state_dict(adapter.from_hf(hf_sd))
    _assert_same_logits(mot.eval(), llama, 2)
    back = adapter.to_hf(mot.state_dict())  # exports modality 0
    assert set(back) == set(hf_sd)
    for key, value in hf_sd.items():
        assert torch.equal(back[key], value), key


@pytest.mark.slow
def test_warm_start_from_hf_folder(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    args = dataclasses.replace(_mot_args("debugmodel"), max_seq_len=64)
    llama = _dense_like("debugmodel", args.vocab_size)
    (tmp_path / "hf").mkdir()
    save_file(hf_llama_state_dict(llama), str(tmp_path / "hf" / "model.safetensors"))
    _run_script("--dense", str(tmp_path / "hf"), "--flavor", "debugmodel",
                "--config", str(CONFIG), "--out", str(tmp_path / "mot"))
    _assert_same_logits(_load_mot(tmp_path / "mot", args), llama, 2)


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_save_leaves_no_checkpoint_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DCP fails after writing the tensor files, before `.metadata`: no folder (partial or
    not) is left at --out, and a checkpoint being replaced with --force stays as it was."""
    dense = _dense_like("debugmodel", 1000).state_dict()
    dcp.save(dense, checkpoint_id=str(tmp_path / "dense"), no_dist=True)
    out = tmp_path / "mot"
    written: list[str] = []

    def fail_before_metadata(self: FileSystemWriter, metadata: object, results: object) -> None:
        written.extend(p.name for p in Path(self.path).iterdir())
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(FileSystemWriter, "finish", fail_before_metadata)
        with pytest.raises(CheckpointException, match="disk full"):
            warm_start(tmp_path / "dense", CONFIG, "debugmodel", out)
    assert any(name.endswith(".distcp") for name in written)  # it did fail midway
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]

    warm_start(tmp_path / "dense", CONFIG, "debugmodel", out)
    before = _tree_bytes(out)
    with monkeypatch.context() as patch:
        patch.setattr(FileSystemWriter, "finish", fail_before_metadata)
        with pytest.raises(CheckpointException, match="disk full"):
            warm_start(tmp_path / "dense", CONFIG, "debugmodel", out, seed=1, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "mot"]
    assert _tree_bytes(out) == before


@pytest.mark.slow
def test_trainer_starts_from_the_warm_start_weights(tmp_path: Path) -> None:
    """The real entry point, given the output as --checkpoint.initial_load_path, trains from
    exactly its weights: with lr 0 the step-1 checkpoint equals the warm start, whose
    modality copies are the dense weights."""
    llama = _dense_like("debugmodel", 1000)
    dcp.save(llama.state_dict(), checkpoint_id=str(tmp_path / "dense"), no_dist=True)
    _run_script("--dense", str(tmp_path / "dense"), "--flavor", "debugmodel",
                "--config", str(CONFIG), "--out", str(tmp_path / "mot"))
    run_trainer(small_args(
        tmp_path / "run", 1, "--optimizer.lr", "0", "--checkpoint.enable", "--checkpoint.interval", "1",
        "--checkpoint.initial_load_path", str(tmp_path / "mot")))
    args = _mot_args("debugmodel")
    with torch.device("meta"):
        template = MoTTransformer(args).state_dict()
    source, trained = ({k: torch.empty(v.shape, dtype=v.dtype) for k, v in template.items()} for _ in "ab")
    dcp.load(source, checkpoint_id=str(tmp_path / "mot"), no_dist=True)
    dcp.load(trained, checkpoint_id=str(tmp_path / "run" / "checkpoint" / "step-1"), no_dist=True)
    for key in template:
        assert torch.equal(trained[key], source[key]), key
    dense = llama.state_dict()
    assert torch.equal(trained["layers.3.attention.wq.1.weight"], dense["layers.3.attention.wq.weight"])
    assert torch.equal(trained["tok_embeddings.weight"][:1000], dense["tok_embeddings.weight"])


@pytest.mark.slow
def test_untie_subset_warm_start_trains_and_other_setting_is_refused(tmp_path: Path) -> None:
    """`--untie ffn` warm start feeds a `--mot.untie ffn` run (start-up summary names the
    setting); the same checkpoint is refused by full MoT, naming the missing copies."""
    llama = _dense_like("debugmodel", 1000)
    dcp.save(llama.state_dict(), checkpoint_id=str(tmp_path / "dense"), no_dist=True)
    _run_script("--dense", str(tmp_path / "dense"), "--flavor", "debugmodel",
                "--config", str(CONFIG), "--out", str(tmp_path / "mot"), "--untie", "ffn")

    def train(name: str, steps: int, *flags: str) -> tuple[int, str]:
        result = run_trainer(small_args(
            tmp_path / name, steps, "--checkpoint.enable", "--checkpoint.interval", "1000",
            "--checkpoint.initial_load_path", str(tmp_path / "mot"), *flags), check=False)
        return result.returncode, result.stdout + result.stderr

    code, log = train("ffn", 5, "--mot.untie", "ffn")
    assert code == 0, log[-3000:]
    assert "untied: ffn; params " in log
    assert f"Loading the checkpoint from {tmp_path / 'mot'}" in log
    losses = read_scalars(tmp_path / "ffn")
    assert sorted(losses) == [1, 2, 3, 4, 5] and losses[5] < losses[1] - 0.5, losses
    # the step-0 model scalars: the untie setting and the parameter count of that model
    args = dataclasses.replace(_mot_args("debugmodel"), untie=["ffn"])
    with torch.device("meta"):
        numel = sum(p.numel() for p in MoTTransformer(args).parameters())
    model = {tag: read_scalars(tmp_path / "ffn", f"model/{tag}") for tag in
             ("params", "untied_attention", "untied_ffn", "untied_norms")}
    assert model == {"params": {0: numel}, "untied_attention": {0: 0.0}, "untied_ffn": {0: 1.0},
                     "untied_norms": {0: 0.0}}, model
    code, log = train("full", 1)
    assert code != 0
    assert "mot.untie setting" in log and "missing from the checkpoint: layers.0.attention.wk.1.weight" in log


def test_warm_start_upcycles_an_mot_checkpoint_into_the_hybrid(tmp_path: Path) -> None:
    """`warm_start` of an MoE flavor: the MoT checkpoint's text FFN seeds every text expert,
    and the output fits the hybrid model exactly (the start-up checkpoint check passes)."""
    from torchtitan_mot.trainer.checkpoint_check import check_checkpoint_matches

    args, _ = mot_target(CONFIG, "debugmodel")
    torch.manual_seed(0)
    mot = MoTTransformer(args)
    with torch.no_grad():
        mot.init_weights()
    dcp.save(mot.state_dict(), checkpoint_id=str(tmp_path / "mot"), no_dist=True)
    hybrid_args = warm_start(tmp_path / "mot", CONFIG, "debugmodel_hybrid", tmp_path / "out", seed=1)
    assert hybrid_args.moe_modalities == [0]
    with torch.device("meta"):
        hybrid = MoTTransformer(hybrid_args)
    check_checkpoint_matches(str(tmp_path / "out"), hybrid.state_dict())
    experts = torch.empty(4, *mot.layers["2"].feed_forward.w3[0].weight.shape)
    dcp.load({"layers.2.feed_forward.moe.0.experts.w3": experts}, checkpoint_id=str(tmp_path / "out"), no_dist=True)
    text = mot.layers["2"].feed_forward.w3[0].weight.detach()
    assert ((experts - text).abs().amax(dim=(1, 2)) < 6 * 0.01 * text.std()).all()
