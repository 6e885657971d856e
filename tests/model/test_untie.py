"""`untie`: only the listed components get per-modality weights; the rest is the dense layer."""

import copy
import itertools

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchtitan.models.llama3 import Transformer, TransformerModelArgs

from torchtitan_mot import build_model_args, mot_args
from torchtitan_mot.model import MoTModelArgs, MoTTransformer
from torchtitan_mot.model.args import check_untie
from torchtitan_mot.model.feedforward import ffn_hidden_dim
from torchtitan_mot.model.state_dict_adapter import (
    MoTStateDictAdapter,
    tie_to_dense_state_dict,
    untie_dense_state_dict,
)
from torchtitan_mot.trainer.checkpoint_check import check_checkpoint_matches, CheckpointMismatchError
from helpers import make_norms_informative

SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, rope_theta=500000,
             max_seq_len=32)
SUBSETS = [list(c) for r in (1, 2, 3) for c in itertools.combinations(("attention", "ffn", "norms"), r)]


def _llama() -> Transformer:
    torch.manual_seed(0)
    llama = Transformer(TransformerModelArgs(**SHAPE))
    with torch.no_grad():
        llama.init_weights()
    make_norms_informative(llama)
    return llama.eval()


@pytest.mark.parametrize("untie", [["ffn"], ["attention"], ["norms"], ["attention", "norms"]])
@pytest.mark.parametrize("n_mod", [2, 3])
def test_untied_copies_of_llama3_give_llama3_logits(untie: list[str], n_mod: int) -> None:
    llama = _llama()
    mot = MoTTransformer(MoTModelArgs(n_modalities=n_mod, untie=untie, **SHAPE)).eval()
    mot.load_state_dict(untie_dense_state_dict(llama.state_dict(), mot.state_dict()))
    tokens = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = llama(tokens)
        for ids in (torch.randint(0, n_mod, (2, 32)), torch.zeros(2, 32, dtype=torch.long),
                    torch.full((2, 32), n_mod - 1)):
            torch.testing.assert_close(mot(tokens, modality_ids=ids), expected,
                                       rtol=1e-5, atol=1e-5)


def test_only_listed_components_are_untied() -> None:
    """Keys: a shared component has the dense twin's single `.0.` copy. Behaviour: moving
    the image copy of the FFN changes image tokens only where the FFN is untied."""
    mot = MoTTransformer(MoTModelArgs(n_modalities=2, untie=["ffn"], qk_norm=True, **SHAPE))
    keys = {k for k in mot.state_dict() if k.startswith("layers.0.")}
    assert keys == {
        *(f"layers.0.attention.{w}.0.weight" for w in ("wq", "wk", "wv", "wo", "q_norm", "k_norm")),
        *(f"layers.0.feed_forward.{w}.{m}.weight" for w in ("w1", "w2", "w3") for m in (0, 1)),
        "layers.0.attention_norm.0.weight", "layers.0.ffn_norm.0.weight",
    }
    torch.manual_seed(0)
    with torch.no_grad():
        mot.init_weights()
    tokens = torch.randint(0, 97, (1, 32))
    text = torch.zeros(1, 32, dtype=torch.long)
    with torch.no_grad():
        before = mot(tokens, modality_ids=text)
        mot.layers["1"].feed_forward.w2[1].weight.add_(1.0)
        torch.testing.assert_close(mot(tokens, modality_ids=text), before, rtol=0, atol=0)
        assert not torch.allclose(mot(tokens, modality_ids=torch.ones_like(text)), before)


def _by_hand(a: MoTModelArgs) -> tuple[int, int]:
    """(total, active) parameters from the shapes, counted independently of the library."""
    hd, kv = a.dim // a.n_heads, a.n_kv_heads or a.n_heads
    hidden = ffn_hidden_dim(a.dim, a.multiple_of, a.ffn_dim_multiplier)
    sets = {"attention": a.dim * hd * (2 * a.n_heads + 2 * kv), "ffn": 3 * a.dim * hidden,
            "norms": 2 * a.dim}
    shared = 2 * a.vocab_size * a.dim + a.dim
    copies = {c: a.n_modalities if c in a.untie else 1 for c in sets}
    return (shared + a.n_layers * sum(copies[c] * n for c, n in sets.items()),
            shared + a.n_layers * sum(sets.values()))


@pytest.mark.parametrize("untie", SUBSETS, ids=",".join)
def test_param_counts_and_active_flops_8b(untie: list[str]) -> None:
    args = copy.deepcopy(mot_args["8B_2modality"])
    args.vocab_size, args.max_seq_len, args.untie = 128256 + 2 * (8192 + 2), 4096, untie
    with torch.device("meta"):
        model = MoTTransformer(args)
    total, active = _by_hand(args)
    nparams, flops = args.get_nparams_and_flops(model, 4096)
    assert nparams == sum(p.numel() for p in model.parameters()) == total
    assert args.param_counts() == (total, active)
    dense = copy.deepcopy(args)
    dense.n_modalities, dense.untie = 1, []
    with torch.device("meta"):
        dense_model = MoTTransformer(dense)
    assert dense.get_nparams_and_flops(dense_model, 4096) == (active, flops)


@pytest.mark.parametrize("untie, n_mod, message", [
    (["mlp"], 2, r"unknown component\(s\) \['mlp'\]; allowed values: \['attention', 'ffn', 'norms'\]"),
    (["ffn", "norms", "ffn"], 2, r"\['ffn'\] listed more than once; allowed values"),
    ([], 2, r"with nothing untied an MoT flavor is its dense twin"),
    (["ffn"], 1, r"has no effect on a dense flavor"),
])
def test_bad_untie_is_rejected(untie: list[str], n_mod: int, message: str) -> None:
    with pytest.raises(ValueError, match=r"mot\.untie = .*" + message):
        check_untie(untie, n_mod)
    with pytest.raises(ValueError, match=r"MoTModelArgs\.untie"):
        MoTModelArgs(n_modalities=n_mod, untie=untie)


def test_hf_adapter_and_export_follow_untie() -> None:
    """from_hf gives exactly the model's keys; exporting modality 1 includes shared weights."""
    args = MoTModelArgs(n_modalities=2, untie=["attention"], **SHAPE)
    mot = MoTTransformer(args)
    llama_sd = _llama().state_dict()
    adapter = MoTStateDictAdapter(args, None)
    loaded = adapter.from_hf(adapter.to_hf(untie_dense_state_dict(llama_sd, mot.state_dict())))
    assert set(loaded) == set(mot.state_dict())
    for modality in (0, 1):
        exported = tie_to_dense_state_dict(loaded, modality)
        assert set(exported) == set(llama_sd)
        assert all(torch.equal(exported[k], llama_sd[k]) for k in llama_sd)


def test_checkpoint_of_another_setting_is_refused(tmp_path) -> None:
    full = MoTTransformer(MoTModelArgs(n_modalities=2, **SHAPE))
    dcp.save(full.state_dict(), checkpoint_id=str(tmp_path), no_dist=True)
    ffn_only = MoTTransformer(MoTModelArgs(n_modalities=2, untie=["ffn"], **SHAPE))
    with pytest.raises(CheckpointMismatchError,
                       match=r"mot.untie setting.*checkpoint keys the model does not have: "
                             r"layers\.0\.attention\.wk\.1\.weight"):
        check_checkpoint_matches(str(tmp_path), ffn_only.state_dict())


def test_config_reaches_model_args_and_bad_values_fail_at_start_up() -> None:
    """`--mot.untie` (TorchTitan's comma-separated list flag) goes through update_from_config."""
    from pathlib import Path

    from torchtitan_mot.config import load_job_config

    config = Path(__file__).resolve().parents[2] / "train_configs" / "debug_mot.toml"

    def args_for(flavor: str, untie: str) -> MoTModelArgs:
        job = load_job_config(["--job.config_file", str(config), "--model.flavor", flavor, "--mot.untie", untie])
        return build_model_args(job)

    assert args_for("debugmodel", "ffn,norms").untie == ["ffn", "norms"]
    assert args_for("debugmodel_dense", "").untie == []
    with pytest.raises(ValueError, match=r"mot\.untie = \['ffn', 'mlp'\]: unknown component"):
        args_for("debugmodel", "ffn,mlp")
    with pytest.raises(ValueError, match=r"mot\.untie = \[\]: with nothing untied"):
        args_for("debugmodel", "")
