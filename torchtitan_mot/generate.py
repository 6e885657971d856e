"""Modality-constrained autoregressive sampling from a trained MoT checkpoint.

    python -m torchtitan_mot.generate --checkpoint outputs/compare_dense/mot \
        --config train_configs/compare_dense.toml \
        --prompt "a handwritten digit seven" --prompt "handwritten 3" \
        --temperature 1.0 --top-k 20 --out outputs/compare_dense/generated_grid.png

Inside a non-text segment only that modality's codebook ids are valid: a free-running sample
could emit a text id or another modality's id, which the codec cannot decode and which would
route the next position through the wrong modality's weights. `generate_segment` therefore
forces the begin marker, samples exactly `n_tokens` ids from the codebook alone (their
`modality_ids` are that modality's, as in training) and closes with the end marker.

In the Transfusion setting (`[mot].diffusion_modalities`) an image is continuous latents:
`generate_latent_segment` forces the begin marker, fills the image's latent positions with
the diffusion sampler (`DiffusionSchedule.ddpm_sample` / `ddim_sample`; each step is one
forward of the whole prefix plus the noised latents, which see each other and the caption but
nothing after them) and closes with the end marker.

The command line turns each prompt into `[bos] + text`, samples one image after it that way,
and decodes it (discrete: the dataset's image tokenizer recorded in its meta.json; latents:
the dataset's latent encoder, pixels or diffusers' AutoencoderKL, after unpatchifying) into a
PNG grid with one row per prompt, titled with the prompt. `--dataset` is the data the
checkpoint was trained on (default the config's `[training].dataset_path`); its meta.json also
gives the vocabulary. The config (plus `--flavor`) must describe the checkpoint's model.
"""

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torchtitan.config import JobConfig

from torchtitan_mot import build_model_args
from torchtitan_mot.config import ConfigError, load_job_config
from torchtitan_mot.data.tokenizer import build_mot_tokenizer, VocabLayout
from torchtitan_mot.model import MoTTransformer
from torchtitan_mot.model.patches import unpatchify
from torchtitan_mot.model.schedule import DiffusionSchedule, EpsFn
from torchtitan_mot.trainer.checkpoint_check import check_checkpoint_matches, CheckpointMismatchError

IMAGE = "image"
SAMPLERS = ("ddpm", "ddim")


def sample_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) ids; temperature 0 is greedy. Masked (-inf) ids are never drawn."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_segment(
    model: nn.Module,
    prompt: torch.Tensor,
    layout: VocabLayout,
    modality: str,
    n_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue (B, T) `prompt` ids with one `modality` segment: begin marker, `n_tokens`
    codebook ids sampled only from that codebook, end marker. Returns (B, T + n_tokens + 2).

    No KV cache: each step re-runs the sequence, which is fine for the short demo segments.
    """
    table = layout.token_modality_table().to(prompt.device)
    lo, hi = layout.codebook_range(modality)
    if layout.modality_index(modality) == 0:
        raise ValueError("constrained segment sampling is for non-text modalities")
    outside = torch.ones(layout.vocab_size, dtype=torch.bool, device=prompt.device)
    outside[lo:hi] = False
    begin = torch.full_like(prompt[:, :1], layout.begin_id(modality))
    ids = torch.cat([prompt, begin], dim=1)
    for _ in range(n_tokens):
        logits = model(ids, modality_ids=table[ids])[:, -1]
        nxt = sample_token(logits.masked_fill(outside, float("-inf")), temperature, top_k, generator)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return torch.cat([ids, torch.full_like(begin, layout.end_id(modality))], dim=1)


@torch.no_grad()
def generate_latent_segment(
    model: nn.Module,
    prompt: torch.Tensor,
    layout: VocabLayout,
    modality: str,
    n_positions: int,
    patch_dim: int,
    schedule: DiffusionSchedule,
    steps: int = 250,
    sampler: str = "ddpm",
    generator: torch.Generator | None = None,
    guidance: float = 1.0,
    unconditional: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue (B, T) `prompt` ids with one continuous `modality` segment: begin marker,
    `n_positions` latent positions sampled by diffusion, end marker.

    Returns the ids (B, T + n_positions + 2), latent positions holding the begin id as their
    placeholder (as the dataset writes them), and the clean latent patches (B, n_positions,
    patch_dim) in float32. Each of the `steps` sampler steps runs one forward of the prompt,
    the begin marker and the noised patches at the step's timestep, all positions of one
    image (image_ids 0); the model's mask makes them see each other and, causally, the prompt.
    No KV cache of the prompt: the demo prompts are short.

    Classifier-free guidance (`guidance` != 1): eps = eps_u + guidance (eps_c - eps_u), eps_u
    from a second forward with the (B, T_u) `unconditional` prompt in place of `prompt`
    (the command uses `[bos]`, an empty caption: in training that is the context of an image
    that opens its sample ahead of its caption, 1 - caption_first_prob of the captioned ones).
    """
    if layout.modality_index(modality) == 0:
        raise ValueError("diffusion segment sampling is for non-text modalities")
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler {sampler!r}: known samplers {list(SAMPLERS)}")
    if (guidance != 1.0) != (unconditional is not None):
        raise ValueError(f"guidance {guidance} needs an unconditional prompt, and only guidance != 1 uses one")
    bsz = prompt.shape[0]
    device = prompt.device
    conditional = _latent_eps_fn(model, prompt, layout, modality, n_positions, patch_dim)
    if unconditional is None:
        eps_fn = conditional
    else:
        uncond = _latent_eps_fn(model, unconditional, layout, modality, n_positions, patch_dim)

        def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
            eps_u = uncond(x, t)
            return eps_u + guidance * (conditional(x, t) - eps_u)

    noise = torch.randn(bsz, n_positions, patch_dim, generator=generator, device=device)
    if sampler == "ddpm":
        x0 = schedule.ddpm_sample(eps_fn, noise, steps, generator=generator)
    else:
        x0 = schedule.ddim_sample(eps_fn, noise, steps)
    ids = torch.cat([prompt, torch.full((bsz, 1 + n_positions), layout.begin_id(modality), device=device),
                     torch.full((bsz, 1), layout.end_id(modality), device=device)], 1)
    return ids, x0


def _latent_eps_fn(
    model: nn.Module, prompt: torch.Tensor, layout: VocabLayout, modality: str, n_positions: int, patch_dim: int
) -> EpsFn:
    """x_t (B, n_positions, patch_dim), t -> the model's eps at the latent positions of
    `prompt`, BOI, n_positions placeholders (one image, image id 0)."""
    bsz, length = prompt.shape
    device = prompt.device
    ids = torch.cat([prompt, torch.full((bsz, 1 + n_positions), layout.begin_id(modality), device=device)], 1)
    modality_ids = layout.token_modality_table().to(device)[ids]
    latent = slice(length + 1, length + 1 + n_positions)
    image_ids = torch.full_like(ids, -1)
    image_ids[:, latent] = 0

    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        patches = torch.zeros(bsz, ids.shape[1], patch_dim, device=device)
        patches[:, latent] = x
        timesteps = torch.zeros_like(ids)
        timesteps[:, latent] = t
        _, eps = model(ids, modality_ids=modality_ids, patches=patches, timesteps=timesteps, image_ids=image_ids)
        return eps[:, latent].float()

    return eps_fn


def decode_latents(
    patches: torch.Tensor, shape: tuple[int, int, int], patch_size: int, decode: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """(B, N, P) clean latent patches -> (B, height, width, channels) pixels in [0, 1]: the
    latents unpatchified to `shape` (C, H, W), each decoded by `decode` (the dataset's latent
    encoder's `decode`: pixels rescaled, or the VAE)."""
    latents = unpatchify(patches.float(), shape, patch_size).cpu().numpy()
    return np.stack([decode(z) for z in latents])


def resolve_checkpoint(path: str | Path) -> Path:
    """A DCP step folder (has `.metadata`), or the newest `step-N` under `path` or
    `path/checkpoint` (a trainer's checkpoint folder or dump folder)."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    for folder in (path, path / "checkpoint"):
        steps = [p for p in folder.glob("step-*") if (p / ".metadata").is_file()]
        if steps:
            return max(steps, key=lambda p: int(p.name.split("-")[1]))
    raise FileNotFoundError(f"no DCP checkpoint (step-N folder with .metadata) at or under {path}")


def load_model(job_config: JobConfig, checkpoint: str | Path, device: str = "cpu") -> nn.Module:
    """The config's model flavor with weights from a TorchTitan checkpoint, in eval mode.

    TorchTitan stores model weights under their plain state-dict names in both model-only
    and full checkpoints, so `dcp.load` into the model's own state dict reads either.
    """
    args = build_model_args(job_config)
    with torch.device(device), torch.no_grad():
        model = MoTTransformer(args)
        model.init_weights()  # also builds the non-persistent RoPE table
    state = model.state_dict()
    # dcp.load reads only the model's keys: a checkpoint with extra copies (another
    # mot.untie or flavor) would load silently; refuse it, listing the keys.
    check_checkpoint_matches(str(resolve_checkpoint(checkpoint)), state)
    dcp.load(state, checkpoint_id=str(resolve_checkpoint(checkpoint)))
    model.load_state_dict(state)
    return model.requires_grad_(False).eval()


def save_png_grid(images: np.ndarray, path: str | Path, titles: list[str] | None = None) -> None:
    """Write (N, H, W, channels) pixels in [0, 1] (what an image tokenizer's `decode` returns)
    side by side, up to 10 per row, as a PNG so samples can be eyeballed. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(n, 10)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.4 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            image = np.clip(images[i], 0.0, 1.0)
            grey = image.shape[-1] == 1
            ax.imshow(image[..., 0] if grey else image, cmap="gray" if grey else None, vmin=0.0, vmax=1.0,
                      interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m torchtitan_mot.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="DCP step folder, checkpoint folder or dump folder")
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--config", default="train_configs/debug_mot.toml")
    p.add_argument("--flavor", help="model flavor, if not the config's")
    p.add_argument("--samples", type=int, default=10, help="images per prompt")
    p.add_argument("--temperature", type=float, default=None, help="discrete images: 0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="discrete images")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="latent images ([mot].diffusion_modalities): ddpm (ancestral, default) or ddim (eta 0)")
    p.add_argument("--steps", type=int, default=None,
                   help="latent images: sampling steps, strided over the training timesteps (default 250)")
    p.add_argument("--guidance", type=float, default=None,
                   help="latent images: classifier-free guidance scale against an empty caption (default 1.0: off)")
    p.add_argument("--dataset", help="the dataset the checkpoint was trained on: its meta.json gives the "
                   "vocabulary and the image tokenizer or latent decoder of the samples (default: the "
                   "config's [training].dataset_path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs") / "generated_grid.png")
    args = p.parse_args(argv)
    try:
        _generate(args, p)
    except (ConfigError, CheckpointMismatchError, FileNotFoundError) as e:
        # each names its file, flag or checkpoint keys: one line, as the trainer prints them
        p.exit(2, f"{p.prog}: error: {e}\n")


def _generate(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """Sample every prompt's images from the checkpoint and write the grid."""
    cfg = load_job_config(["--job.config_file", args.config]
                          + (["--model.flavor", args.flavor] if args.flavor else [])
                          + (["--training.dataset_path", args.dataset] if args.dataset else []))
    diffusion = IMAGE in cfg.mot.diffusion_modalities
    # Flags of the other kind of image would silently do nothing.
    latent_flags = (("--sampler", args.sampler), ("--steps", args.steps), ("--guidance", args.guidance))
    unused = ([f for f, v in latent_flags if v is not None] if not diffusion
              else [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k)) if v is not None])
    if unused:
        kind = "latent (diffusion)" if diffusion else "discrete-token"
        p.error(f"{', '.join(unused)} do(es) not apply: {args.config} trains {kind} images")
    tokenizer = build_mot_tokenizer(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = resolve_checkpoint(args.checkpoint)
    if diffusion:
        # The encoder that made the dataset's latents decodes them ([prepare] extra; a VAE needs [latent]).
        from torchtitan_mot.data.prepare.latent import load_latent_encoder

        encoder = load_latent_encoder(cfg.training.dataset_path, IMAGE)
        schedule = DiffusionSchedule(cfg.mot.diffusion_timesteps, cfg.mot.diffusion_schedule)
        steps = 250 if args.steps is None else args.steps
        schedule.sampling_timesteps(steps)  # a bad --steps fails before the model loads
        c, h, w = encoder.shape
        size = cfg.mot.diffusion_patch_size
        n_positions, patch_dim = (h // size) * (w // size), c * size * size
        guidance = 1.0 if args.guidance is None else args.guidance
        settings = f"{args.sampler or 'ddpm'}, {steps} steps, guidance {guidance}"
    else:
        # Decoding discrete images needs the [prepare] extra (Pillow); sampling alone does not.
        from torchtitan_mot.data.prepare import load_tokenizer

        codec = load_tokenizer(cfg.training.dataset_path, IMAGE)
        temperature = 1.0 if args.temperature is None else args.temperature
        settings = f"T={temperature}, top-k={args.top_k}"
    model = load_model(cfg, checkpoint, device)
    generator = torch.Generator(device).manual_seed(args.seed)

    images, titles = [], []
    for prompt in args.prompt:
        ids = [tokenizer.bos_id] + tokenizer.encode_segment("text", text=prompt)
        batch = torch.tensor([ids] * args.samples, device=device)
        if diffusion:
            empty = batch[:, :1] if guidance != 1.0 else None  # [bos]: the empty caption
            _, patches = generate_latent_segment(model, batch, tokenizer.layout, IMAGE, n_positions, patch_dim,
                                                 schedule, steps, args.sampler or "ddpm", generator, guidance, empty)
            images.extend(decode_latents(patches, encoder.shape, size, encoder.decode))
        else:
            out = generate_segment(model, batch, tokenizer.layout, IMAGE, codec.tokens_per_item,
                                   temperature, args.top_k, generator)
            for row in out.tolist():
                segments = tokenizer.decode_segments(row)
                (image,) = [s["tokens"] for s in segments if s["modality"] == IMAGE]
                images.append(codec.decode(np.array(image)))
        titles += [prompt] + [""] * (args.samples - 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_png_grid(np.stack(images), args.out, titles=titles)
    print(f"{len(images)} images from {checkpoint} ({cfg.model.flavor}, {settings}) -> {args.out}")


if __name__ == "__main__":
    main()
