"""Text-to-image sampling from a trained MoT checkpoint, rendered as a PNG grid.

    python scripts/generate.py --checkpoint outputs/compare_dense/mot \
        --config train_configs/compare_dense.toml \
        --prompt "a handwritten digit seven" --prompt "handwritten 3" \
        --temperature 1.0 --top-k 20 --out assets/generated_grid.png

Each prompt becomes `[bos] + text`, then the image begin marker is forced, exactly one
image's worth of tokens is sampled from the image codebook only
(`torchtitan_mot.generate.generate_segment`), the end marker closes it, and the dataset's
image tokenizer (recorded in its meta.json; `--dataset`, default the config's
`[training].dataset_path`) decodes the tokens to pixels; the grid has one row per prompt
(10 samples, `save_png_grid`'s row width), titled with the prompt. The config (plus `--flavor`) must describe the checkpoint's
model.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from torchtitan.config import ConfigManager

from torchtitan_mot.data.prepare import load_tokenizer
from torchtitan_mot.data.tokenizer import build_mot_tokenizer
from torchtitan_mot.generate import generate_segment, load_model, resolve_checkpoint, save_png_grid

REPO = Path(__file__).resolve().parents[1]
MODALITY = "image"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="DCP step folder, checkpoint folder or dump folder")
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--config", default=str(REPO / "train_configs" / "debug_mot.toml"))
    p.add_argument("--flavor", help="model flavor, if not the config's")
    p.add_argument("--samples", type=int, default=10, help="images per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--dataset", help="dataset whose image tokenizer decodes the samples (default: the "
                   "config's [training].dataset_path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "assets" / "generated_grid.png")
    args = p.parse_args()

    overrides = ["--job.config_file", args.config, "--job.custom_config_module", "torchtitan_mot.config"]
    if args.flavor:
        overrides += ["--model.flavor", args.flavor]
    cfg = ConfigManager().parse_args(overrides)
    tokenizer = build_mot_tokenizer(cfg)
    codec = load_tokenizer(args.dataset or cfg.training.dataset_path, MODALITY)
    n_tokens = codec.tokens_per_item
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_model(cfg, checkpoint, device)
    generator = torch.Generator(device).manual_seed(args.seed)

    images, titles = [], []
    for prompt in args.prompt:
        ids = [tokenizer.bos_id] + tokenizer.encode_segment("text", text=prompt)
        batch = torch.tensor([ids] * args.samples, device=device)
        out = generate_segment(model, batch, tokenizer.layout, MODALITY, n_tokens,
                               args.temperature, args.top_k, generator)
        for row in out.tolist():
            segments = tokenizer.decode_segments(row)
            (image,) = [s["tokens"] for s in segments if s["modality"] == MODALITY]
            images.append(codec.decode(np.array(image)))
            titles.append(prompt if len(titles) % args.samples == 0 else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_png_grid(np.stack(images), args.out, titles=titles)
    print(f"{len(images)} images from {checkpoint} ({cfg.model.flavor}, T={args.temperature}, "
          f"top-k={args.top_k}) -> {args.out}")


if __name__ == "__main__":
    main()
