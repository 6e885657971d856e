"""Dataloader throughput (tokens/s) on the demo data, CPU only.

    python scripts/bench_data.py [--variant text_image_speech] [--batches 50]

Times `--batches` batches after a warm-up batch (worker start-up excluded) for every
combination of num_workers {0, 2}, seq_len {512, 2048}, map-style and streaming; batch 8.
"""

import argparse
import itertools
import time
from pathlib import Path

from torchtitan.config import ConfigManager

from torchtitan_mot.data import build_mot_dataloader, build_mot_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def tokens_per_second(variant: str, seq_len: int, num_workers: int, streaming: bool, batches: int) -> float:
    meta = {"text_image": ("text,image", ["256"]), "text_image_speech": ("text,image,speech", ["256", "256"])}
    modalities, sizes = meta[variant]
    cfg = ConfigManager().parse_args(
        [
            "--job.custom_config_module", "torchtitan_mot.config",
            "--model.hf_assets_path", str(ROOT / "assets" / "tokenizer"),
            "--training.dataset_path", str(ROOT / "assets" / "demo" / variant),
            "--training.seq_len", str(seq_len),
            "--training.local_batch_size", "8",
            "--training.dataloader.num_workers", str(num_workers),
            "--mot.modalities", modalities,
            "--mot.codebook_sizes", *sizes,
            *(["--mot.streaming"] if streaming else []),
        ]
    )
    loader = build_mot_dataloader(1, 0, build_mot_tokenizer(cfg), cfg, infinite=True)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    n_tokens = sum(x["input"].numel() for x, _ in itertools.islice(it, batches))
    return n_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="text_image_speech", choices=["text_image", "text_image_speech"])
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args()
    print(f"variant={args.variant} batch=8 batches={args.batches}")
    print(f"{'mode':>10} {'workers':>7} {'seq_len':>7} {'tokens/s':>12}")
    for streaming, workers, seq_len in itertools.product([False, True], [0, 2], [512, 2048]):
        tps = tokens_per_second(args.variant, seq_len, workers, streaming, args.batches)
        mode = "streaming" if streaming else "map"
        print(f"{mode:>10} {workers:>7} {seq_len:>7} {tps:>12,.0f}", flush=True)


if __name__ == "__main__":
    main()
