"""Modality-constrained sampling with a random tiny MoT, and checkpoint loading."""

from pathlib import Path

import numpy as np
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


# --- The Transfusion setting: latent images sampled by diffusion -----------------------------

SHAPE = (3, 4, 6)  # (C, H, W) of a latent
PATCH = 2
N_POS, PATCH_DIM = (4 // PATCH) * (6 // PATCH), 3 * PATCH * PATCH
IMAGES = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(4)) * 2 - 1


def oracle_patches(prompt: torch.Tensor) -> torch.Tensor:
    """The clean latent a prompt 'means': one of IMAGES by the parity of its id sum, as
    (N, P) patches written out in the contract's order (row-major grid, (c, py, px))."""
    image = IMAGES[int(prompt.sum()) % 2]
    return torch.stack([image[:, y:y + PATCH, x:x + PATCH].reshape(-1)
                        for y in range(0, SHAPE[1], PATCH) for x in range(0, SHAPE[2], PATCH)])


class OracleModel(torch.nn.Module):
    """Honours the Transfusion forward contract and predicts the exact epsilon of the clean
    latent its caption means, so sampling must land on that latent. Checks every input it gets."""

    def __init__(self, schedule, modality: str = "image") -> None:
        super().__init__()
        self.schedule, self.modality = schedule, modality
        self.timesteps: list[int] = []

    def forward(self, tokens, modality_ids, patches=None, timesteps=None, image_ids=None):
        latent = image_ids >= 0
        bsz, seq = tokens.shape
        n = int(latent[0].sum())
        start = int(latent[0].float().argmax())
        assert (latent[:, start:start + n]).all() and (image_ids[latent] == 0).all()
        assert (tokens[:, start - 1:start + n] == LAYOUT.begin_id(self.modality)).all()  # BOI + placeholders
        assert (modality_ids[:, start - 1:] == LAYOUT.modality_index(self.modality)).all()
        assert (modality_ids[:, :start - 1] == 0).all()
        assert patches.shape == (bsz, seq, PATCH_DIM) and (patches[~latent] == 0).all()
        assert (timesteps[~latent] == 0).all() and (timesteps[latent] == timesteps[0, start]).all()
        t = timesteps[:, start:start + n]
        self.timesteps.append(int(t[0, 0]))
        x0 = torch.stack([oracle_patches(row[:start - 1]) for row in tokens])
        signal, sigma = self.schedule.coefficients(t, torch.float32)
        eps = torch.zeros(bsz, seq, PATCH_DIM, dtype=torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                          else torch.float32)
        eps[:, start:start + n] = (patches[:, start:start + n] - signal[..., None] * x0) / sigma[..., None]
        return torch.zeros(bsz, seq, LAYOUT.vocab_size), eps


PROMPTS = torch.tensor([[1, 5, 7, 9], [1, 5, 7, 10]])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("autocast", [False, True])
def test_latent_generation_lands_on_the_oracle_image(sampler: str, autocast: bool) -> None:
    from torchtitan_mot.generate import decode_latents, generate_latent_segment
    from torchtitan_mot.model.schedule import DiffusionSchedule

    schedule = DiffusionSchedule(1000)
    model = OracleModel(schedule)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ids, patches = generate_latent_segment(model, PROMPTS, LAYOUT, "image", N_POS, PATCH_DIM, schedule,
                                               steps=50, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert model.timesteps == schedule.sampling_timesteps(50)  # one forward per step, the strided grid
    begin, end = LAYOUT.begin_id("image"), LAYOUT.end_id("image")
    assert torch.equal(ids[:, :4], PROMPTS) and (ids[:, 4:-1] == begin).all() and (ids[:, -1] == end).all()
    assert patches.dtype == torch.float32 and patches.shape == (2, N_POS, PATCH_DIM)
    pixels = decode_latents(patches, SHAPE, PATCH, lambda z: (z.transpose(1, 2, 0) + 1) / 2)
    expected = ((IMAGES[[0, 1]] + 1) / 2).permute(0, 2, 3, 1).numpy()  # id sums 22 and 23
    # Measured max error: fp32 0.0 for both samplers; bf16 eps 2.1e-5 (the last step, at
    # alpha_bar ~ 1, scales eps's error by sqrt(1 - alpha_bar_0)). The other caption's image is 0.95 away.
    tol = 6e-5 if autocast else 1e-6
    np.testing.assert_allclose(pixels, expected, atol=tol, rtol=0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_classifier_free_guidance_extrapolates_from_the_empty_caption(sampler: str) -> None:
    """With exact epsilons of two clean latents, the guided eps is the exact eps of
    x0_u + s (x0_c - x0_u), so sampling must land there; two forwards per step."""
    from torchtitan_mot.generate import generate_latent_segment
    from torchtitan_mot.model.schedule import DiffusionSchedule

    schedule = DiffusionSchedule(1000)
    model = OracleModel(schedule)
    empty = PROMPTS[:, :1]  # id sum 1: IMAGES[1]; the captions mean IMAGES[0] and IMAGES[1]
    _, patches = generate_latent_segment(model, PROMPTS, LAYOUT, "image", N_POS, PATCH_DIM, schedule, steps=20,
                                         sampler=sampler, generator=torch.Generator().manual_seed(0),
                                         guidance=3.0, unconditional=empty)
    assert len(model.timesteps) == 40
    x0_u = oracle_patches(empty[0])
    expected = torch.stack([x0_u + 3.0 * (oracle_patches(row) - x0_u) for row in PROMPTS])
    torch.testing.assert_close(patches, expected, atol=4e-6, rtol=0)  # measured 1.2e-6
    assert (patches[1] - x0_u).abs().max() < 4e-6  # caption and empty caption agree: no push


def test_latent_generation_rejects_text_and_unknown_sampler() -> None:
    from torchtitan_mot.generate import generate_latent_segment
    from torchtitan_mot.model.schedule import DiffusionSchedule

    schedule = DiffusionSchedule(10)
    with pytest.raises(ValueError, match="non-text"):
        generate_latent_segment(OracleModel(schedule), PROMPTS, LAYOUT, "text", N_POS, PATCH_DIM, schedule, 5)
    with pytest.raises(ValueError, match="--sampler 'euler'"):
        generate_latent_segment(OracleModel(schedule), PROMPTS, LAYOUT, "image", N_POS, PATCH_DIM, schedule, 5,
                                sampler="euler")
    with pytest.raises(ValueError, match="guidance 2.0 needs an unconditional prompt"):
        generate_latent_segment(OracleModel(schedule), PROMPTS, LAYOUT, "image", N_POS, PATCH_DIM, schedule, 5,
                                guidance=2.0)


def test_sampling_flags_of_the_other_image_kind_are_refused(capsys) -> None:
    from torchtitan_mot.generate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "nowhere", "--prompt", "a seven", "--sampler", "ddim", "--guidance", "3",
              "--config", str(ROOT / "train_configs" / "debug_mot.toml")])
    assert exit_info.value.code == 2
    assert "--sampler, --guidance do(es) not apply" in capsys.readouterr().err


def test_checkpoint_of_another_model_is_a_one_line_error(capsys, tmp_path: Path) -> None:
    """A checkpoint that does not fit the config's model (here: one foreign key) or no
    checkpoint at all: exit status 2 and one `error:` line naming it, no traceback."""
    from torchtitan_mot.generate import main

    dcp.save({"foreign.weight": torch.zeros(2)}, checkpoint_id=str(tmp_path / "checkpoint" / "step-3"))
    config = ["--config", str(ROOT / "train_configs" / "debug_mot.toml"), "--prompt", "a seven"]
    for checkpoint, message in ((tmp_path, "step-3 does not fit this model"),
                                (tmp_path / "nowhere", "no DCP checkpoint")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", str(checkpoint), *config])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert err.startswith("python -m torchtitan_mot.generate: error: ") and message in err, err
        assert "Traceback" not in err and err.count("\n") == 1
