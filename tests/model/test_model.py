"""The MoT model against independent oracles: TorchTitan's Llama3 and itself compiled."""

import re

import pytest
import torch
from torchtitan.models.llama3 import Transformer, TransformerModelArgs

from torchtitan_mot.model import MoTModelArgs, MoTTransformer

SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, rope_theta=500000,
             max_seq_len=32)


def _dense_to_mot(dense_sd: dict[str, torch.Tensor], mot: MoTTransformer) -> dict[str, torch.Tensor]:
    """Every modality copy `x.<m>.weight` gets the dense `x.weight`."""
    out = {}
    for name in mot.state_dict():
        parts = name.split(".")
        if parts[0] == "layers" and parts[-2].isdigit():
            name_dense = ".".join(parts[:-2] + parts[-1:])
        else:
            name_dense = name
        out[name] = dense_sd[name_dense]
    return out


@pytest.mark.parametrize("n_mod", [1, 2, 3])
def test_mot_with_llama3_weights_equals_llama3(n_mod: int) -> None:
    torch.manual_seed(0)
    llama = Transformer(TransformerModelArgs(**SHAPE))
    mot = MoTTransformer(MoTModelArgs(n_modalities=n_mod, **SHAPE))
    with torch.no_grad():
        llama.init_weights()
    mot.load_state_dict(_dense_to_mot(llama.state_dict(), mot))
    tokens = torch.randint(0, 97, (2, 32))
    expected = llama(tokens)
    for ids in (torch.randint(0, n_mod, (2, 32)), torch.zeros(2, 32, dtype=torch.long),
                torch.full((2, 32), n_mod - 1)):
        torch.testing.assert_close(mot(tokens, modality_ids=ids), expected, rtol=1e-5, atol=1e-5)


def test_modalities_are_untied() -> None:
    """A sequence of one modality gives gradients to that modality's copy of every per-
    modality weight and none to the other's; the two modalities give different logits."""
    torch.manual_seed(0)
    mot = MoTTransformer(MoTModelArgs(n_modalities=2, **SHAPE))
    with torch.no_grad():
        mot.init_weights()
    tokens = torch.randint(0, 97, (1, 32))
    logits = []
    for m in (0, 1):
        mot.zero_grad(set_to_none=True)
        out = mot(tokens, modality_ids=torch.full((1, 32), m))
        out.square().sum().backward()
        logits.append(out.detach())
        copies = {name: p.grad for name, p in mot.named_parameters() if re.search(r"\.[01]\.weight$", name)}
        assert len(copies) == 2 * (7 + 2) * SHAPE["n_layers"]  # wq wk wv wo w1 w2 w3 + 2 norms
        for name, grad in copies.items():
            own = int(name.rsplit(".", 2)[1]) == m
            assert (grad is not None and bool(grad.abs().sum() > 0)) == own, (m, name)
    assert not torch.allclose(logits[0], logits[1])


def _three_modality_mot() -> MoTTransformer:
    torch.manual_seed(0)
    mot = MoTTransformer(MoTModelArgs(n_modalities=3, **SHAPE))
    with torch.no_grad():
        mot.init_weights()
    return mot


def test_seed_api_positional_and_flattened_masks() -> None:
    """The seed's documented call, `logits = model(tokens, modality_masks)` with masks
    flattened to (batch*seq,), means exactly what (batch, seq) ids mean."""
    mot = _three_modality_mot()
    tokens = torch.randint(0, 97, (3, 32))
    ids = torch.randint(0, 3, (3, 32))
    modality_masks = [(ids == m).flatten() for m in range(3)]
    expected = mot(tokens, modality_ids=ids)
    assert torch.equal(mot(tokens, modality_masks), expected)
    assert torch.equal(mot(tokens, modality_masks=modality_masks), expected)
    with pytest.raises(ValueError, match="not both"):
        mot(tokens, modality_masks, modality_masks=modality_masks)


def test_modality_masks_equal_modality_ids() -> None:
    mot = _three_modality_mot()
    tokens = torch.randint(0, 97, (2, 32))
    ids = torch.randint(0, 3, (2, 32))
    masks = [ids == m for m in range(3)]
    torch.testing.assert_close(mot(tokens, modality_masks=masks), mot(tokens, modality_ids=ids))
    with pytest.raises(ValueError, match="2 modality_masks for a model built with 3"):
        mot(tokens, modality_masks=masks[:2])
    with pytest.raises(ValueError, match="needs modality_ids"):
        mot(tokens)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        mot(tokens, modality_ids=ids + 1)


@pytest.mark.slow
def test_compiled_blocks_trace_once_for_any_modality_mix() -> None:
    """fullgraph per-block compile; no recompilation when the modality mix changes."""
    from torch._dynamo.utils import counters

    from torchtitan_mot.benchmark.perf import CompileCounts

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    mot = MoTTransformer(MoTModelArgs(n_modalities=3, **SHAPE))
    with torch.no_grad():
        mot.init_weights()
    eager_out = {}
    tokens = torch.randint(0, 97, (2, 32))
    mixes = [torch.randint(0, 3, (2, 32)), torch.zeros(2, 32, dtype=torch.long),
             torch.full((2, 32), 2), torch.randint(1, 3, (2, 32))]
    for i, ids in enumerate(mixes):
        eager_out[i] = mot(tokens, modality_ids=ids)
    for block in mot.layers.values():
        block.compile(fullgraph=True)
    for i, ids in enumerate(mixes):
        out = mot(tokens, modality_ids=ids)
        out.sum().backward()
        torch.testing.assert_close(out, eager_out[i], rtol=1e-4, atol=1e-4)
    # one graph for all blocks (they share code, so one frame), compiled once
    assert CompileCounts.now() == CompileCounts(graphs=1, graph_breaks=0)
