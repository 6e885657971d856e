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

The command line turns each prompt into `[bos] + text`, samples one image's worth of tokens
that way, and decodes them with the dataset's image tokenizer (recorded in its meta.json;
`--dataset`, the data the checkpoint was trained on, default the config's
`[training].dataset_path`; its meta.json also gives the vocabulary) into a PNG grid with one row per
prompt, titled with the prompt. The config (plus `--flavor`) must describe the checkpoint's
model.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torchtitan.config import JobConfig

from torchtitan_mot import build_model_args
from torchtitan_mot.config import load_job_config
from torchtitan_mot.data.tokenizer import build_mot_tokenizer, VocabLayout
from torchtitan_mot.model import MoTTransformer
from torchtitan_mot.trainer.checkpoint_check import check_checkpoint_matches

IMAGE = "image"


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
    # Decoding images needs the [prepare] extra (Pillow); sampling alone does not.
    from torchtitan_mot.data.prepare import load_tokenizer

    p = argparse.ArgumentParser(prog="python -m torchtitan_mot.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="DCP step folder, checkpoint folder or dump folder")
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--config", default="train_configs/debug_mot.toml")
    p.add_argument("--flavor", help="model flavor, if not the config's")
    p.add_argument("--samples", type=int, default=10, help="images per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--dataset", help="the dataset the checkpoint was trained on: its meta.json gives the "
                   "vocabulary and the image tokenizer that decodes the samples (default: the config's "
                   "[training].dataset_path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs") / "generated_grid.png")
    args = p.parse_args(argv)

    cfg = load_job_config(["--job.config_file", args.config]
                          + (["--model.flavor", args.flavor] if args.flavor else [])
                          + (["--training.dataset_path", args.dataset] if args.dataset else []))
    tokenizer = build_mot_tokenizer(cfg)
    codec = load_tokenizer(cfg.training.dataset_path, IMAGE)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_model(cfg, checkpoint, device)
    generator = torch.Generator(device).manual_seed(args.seed)

    images, titles = [], []
    for prompt in args.prompt:
        ids = [tokenizer.bos_id] + tokenizer.encode_segment("text", text=prompt)
        batch = torch.tensor([ids] * args.samples, device=device)
        out = generate_segment(model, batch, tokenizer.layout, IMAGE, codec.tokens_per_item,
                               args.temperature, args.top_k, generator)
        for row in out.tolist():
            segments = tokenizer.decode_segments(row)
            (image,) = [s["tokens"] for s in segments if s["modality"] == IMAGE]
            images.append(codec.decode(np.array(image)))
            titles.append(prompt if len(titles) % args.samples == 0 else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_png_grid(np.stack(images), args.out, titles=titles)
    print(f"{len(images)} images from {checkpoint} ({cfg.model.flavor}, T={args.temperature}, "
          f"top-k={args.top_k}) -> {args.out}")


if __name__ == "__main__":
    main()
