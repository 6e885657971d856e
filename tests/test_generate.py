"""Modality-constrained sampling with a random tiny MoT, and checkpoint loading."""

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from torchtitan_mot import build_model_args
from torchtitan_mot.config import load_job_config
from torchtitan_mot.data.tokenizer import VocabLayout
from torchtitan_mot.generate import generate_segment, load_model, sample_token
from torchtitan_mot.model import MoTModelArgs, MoTTransformer
from torchtitan_mot.trainer.checkpoint_check import CheckpointMismatchError

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = VocabLayout(text_vocab_size=40, modalities=("text", "image", "speech"), codebook_sizes=(12, 9))


class Recorder(torch.nn.Module):
    """Wraps a model and keeps the modality ids of every forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[torch.Tensor] = []

    def forward(self, tokens: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        self.seen.append(modality_ids)
        return self.model(tokens, modality_ids=modality_ids)


def random_model(n_modalities: int = 3) -> MoTTransformer:
    torch.manual_seed(0)
    model = MoTTransformer(MoTModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=LAYOUT.vocab_size,
                                        n_modalities=n_modalities, max_seq_len=64))
    with torch.no_grad():
        model.init_weights()
    return model.eval()


@pytest.mark.parametrize("modality", ["image", "speech"])
def test_constrained_samples_stay_in_the_codebook(modality: str) -> None:
    model = Recorder(random_model())
    prompt = torch.randint(2, LAYOUT.text_vocab_size, (256, 5), generator=torch.Generator().manual_seed(1))
    n = 9
    lo, hi = LAYOUT.codebook_range(modality)
    gen = torch.Generator().manual_seed(0)
    out = generate_segment(model, prompt, LAYOUT, modality, n, temperature=1.5, generator=gen)

    assert out.shape == (256, 5 + n + 2)
    assert torch.equal(out[:, :5], prompt)
    assert (out[:, 5] == LAYOUT.begin_id(modality)).all() and (out[:, -1] == LAYOUT.end_id(modality)).all()
    body = out[:, 6:-1]
    assert ((body >= lo) & (body < hi)).all()
    assert body.unique().numel() == hi - lo  # it does sample, over the whole codebook
    # Generated positions (and the begin marker) run through the segment modality's weights.
    index = LAYOUT.modality_index(modality)
    last = model.seen[-1]
    assert (last[:, :5] == 0).all() and (last[:, 5:] == index).all()
    # The constraint matters: unconstrained, this model mostly picks ids outside the codebook.
    free = model.model(out[:, :-2], modality_ids=last).argmax(-1)[:, 5:]
    assert ((free < lo) | (free >= hi)).float().mean() > 0.5


def test_sampling_controls() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, float("-inf")]]).repeat(500, 1)
    assert (sample_token(logits, temperature=0) == 1).all()
    assert (sample_token(logits, temperature=5.0, top_k=1) == 1).all()
    top2 = sample_token(logits, temperature=5.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(top2.tolist()) == {1, 2}
    anything = sample_token(logits, temperature=50.0, generator=torch.Generator().manual_seed(0))
    assert set(anything.tolist()) == {0, 1, 2}  # never the masked id


def test_text_modality_is_rejected() -> None:
    with pytest.raises(ValueError, match="non-text"):
        generate_segment(random_model(), torch.zeros(1, 2, dtype=torch.long), LAYOUT, "text", 3)


def test_load_model_reads_a_dcp_checkpoint(tmp_path: Path) -> None:
    """A model-only TorchTitan checkpoint stores plain state-dict names; load them back."""
    cfg = load_job_config([
        "--job.config_file", str(ROOT / "train_configs" / "debug_mot.toml"),
        "--model.hf_assets_path", str(ROOT / "assets" / "tokenizer"),
        "--training.seq_len", "32",
    ])
    args = build_model_args(cfg)
    torch.manual_seed(3)
    saved = MoTTransformer(args)
    with torch.no_grad():
        saved.init_weights()
    dcp.save(saved.state_dict(), checkpoint_id=str(tmp_path / "checkpoint" / "step-7"))
    loaded = load_model(cfg, tmp_path)  # a dump folder: finds checkpoint/step-7
    tokens = torch.randint(0, args.vocab_size, (1, 16))
    ids = torch.zeros_like(tokens)
    torch.testing.assert_close(loaded(tokens, modality_ids=ids), saved.eval()(tokens, modality_ids=ids))
    # A config with another mot.untie must not read a subset of the checkpoint silently.
    cfg.mot.untie = ["ffn"]
    with pytest.raises(CheckpointMismatchError, match=r"layers\.0\.attention\.wk\.1\.weight"):
        load_model(cfg, tmp_path)
