"""Flavors: parameter counts match the analytic formula; active flops match the dense twin."""

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn
from torchtitan.models.moe import MoE

from torchtitan_mot import mot_args
from torchtitan_mot.model import MoTModelArgs, MoTTransformer
from torchtitan_mot.model.feedforward import ffn_hidden_dim

VOCAB = 128256 + 2 * (8192 + 2)
REPO = Path(__file__).resolve().parents[2]


def analytic_params(a, vocab: int) -> tuple[int, int]:
    """(total, active) parameters of an MoT flavor, by hand."""
    hd = a.dim // a.n_heads
    kv = a.n_kv_heads or a.n_heads
    hidden = ffn_hidden_dim(a.dim, a.multiple_of, a.ffn_dim_multiplier)
    per_layer = 2 * a.dim * a.n_heads * hd + 2 * a.dim * kv * hd + 3 * a.dim * hidden + 2 * a.dim
    shared = 2 * vocab * a.dim + a.dim
    return shared + a.n_layers * per_layer * a.n_modalities, shared + a.n_layers * per_layer


@pytest.mark.parametrize(
    "flavor", ["8B_2modality", "8B_3modality", "70B_2modality", "70B_3modality", "debugmodel"]
)
def test_param_count_and_active_flops(flavor: str) -> None:
    import copy

    args = copy.deepcopy(mot_args[flavor])
    args.vocab_size, args.max_seq_len = VOCAB, 4096
    with torch.device("meta"):
        model = MoTTransformer(args)
    total, active = analytic_params(args, VOCAB)
    nparams, flops = args.get_nparams_and_flops(model, 4096)
    assert nparams == total
    hd = args.dim // args.n_heads
    attn = 6 * args.n_layers * args.n_heads * 2 * hd * 4096
    assert flops == 6 * (active - VOCAB * args.dim) + attn

    dense = copy.deepcopy(args)
    dense.n_modalities = 1
    with torch.device("meta"):
        dense_model = MoTTransformer(dense)
    assert dense.get_nparams_and_flops(dense_model, 4096)[1] == flops


def test_8b_shapes_are_llama3_8b() -> None:
    a = mot_args["8B_2modality"]
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_dim_multiplier, a.rope_theta) == (
        4096, 32, 32, 8, 1.3, 500000)
    assert ffn_hidden_dim(a.dim, a.multiple_of, a.ffn_dim_multiplier) == 14336
    b = mot_args["70B_3modality"]
    assert (b.dim, b.n_layers, b.n_heads, b.n_kv_heads, b.n_modalities) == (8192, 80, 64, 8, 3)
    assert ffn_hidden_dim(b.dim, b.multiple_of, b.ffn_dim_multiplier) == 28672


def _table(path: Path, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header row starts with `header`, cells stripped
    of backticks (numbers keep their thousands separators)."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().replace("`", "") for c in line.strip("|").split("|")])
    return rows


def _numel(args: MoTModelArgs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in MoTTransformer(args).parameters())


def _counts(args: MoTModelArgs) -> tuple[int, int]:
    """(total, active) parameters of the model built on meta. Active = its dense twin's
    (without MoE), and where every FFN set is an MoE (MoE-4x) plus, per layer, what a token
    computes with in TorchTitan's `MoE` beyond one dense FFN: its top-k experts, the router
    gate, the shared experts. (With dense sets left, the cheapest set counts: the twin's.)"""
    twin = dataclasses.replace(args, n_modalities=1, untie=mot_args["debugmodel_dense"].untie,
                               moe_modalities=[])
    active = _numel(twin)
    if args.moe_modalities and len(args.moe_modalities) == args.n_copies("ffn"):
        with torch.device("meta"):
            moe = MoE(args.moe_args, dim=args.dim, hidden_dim=ffn_hidden_dim(
                args.dim, args.multiple_of, args.ffn_dim_multiplier))
        experts = moe.experts
        per_expert = sum(w[0].numel() for w in (experts.w1, experts.w2, experts.w3))
        token_moe = (per_expert * args.moe_args.top_k + moe.router.gate.weight.numel()
                     + sum(p.numel() for p in (moe.shared_experts or nn.Module()).parameters()))
        active += args.n_layers * (token_moe - per_expert)
    return _numel(args), active


def _rounded(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


@pytest.mark.parametrize("row", _table(REPO / "README.md", "| flavor | layers |"), ids=lambda r: r[0])
def test_readme_flavor_table(row: list[str]) -> None:
    flavor, layers, dim, heads, modalities, attention, vocab, total, active = row
    args = dataclasses.replace(mot_args[flavor], vocab_size=int(vocab.replace(",", "")))
    assert [layers, dim, heads, modalities, attention] == [
        str(args.n_layers), str(args.dim), f"{args.n_heads}/{args.n_kv_heads or args.n_heads}",
        str(args.n_modalities), args.attn_type]
    assert [total, active] == [_rounded(n) for n in _counts(args)]


@pytest.mark.parametrize("row", _table(REPO / "docs" / "untie.md", "| flavor | `untie` |"),
                         ids=lambda r: f"{r[0]}-{r[1]}")
def test_untie_doc_table(row: list[str]) -> None:
    """docs/untie.md's counts, exact; its vocabularies: the README's for the same flavor."""
    flavor, untie, total, active = row
    vocab = {r[0]: int(r[6].replace(",", "")) for r in _table(REPO / "README.md", "| flavor | layers |")}[flavor]
    args = dataclasses.replace(mot_args[flavor], vocab_size=vocab,
                               untie=untie.removesuffix(" (default)").split(","))
    assert (total, active) == tuple(f"{n:,}" for n in _counts(args))
