"""Dataloader throughput (tokens/s), CPU only.

    python -m torchtitan_mot.benchmark.data [--variant text_image_speech]   # the bundled demo data
    python -m torchtitan_mot.benchmark.data --dataset DIR --seq-len 8192 --batch-size 1 --workers 0 1 2

Times `--batches` batches after a warm-up batch (worker start-up excluded), map-style and
streaming, for every listed worker count and sequence length. With `--dataset`, modalities
and codebook sizes come from the dataset's meta.json (e.g. parquet shards written by
`python -m torchtitan_mot.data.prepare`).
"""

import argparse
import itertools
import time
from pathlib import Path

from torchtitan_mot.config import load_job_config
from torchtitan_mot.data import build_mot_dataloader, build_mot_tokenizer


def tokens_per_second(
    dataset: Path, tokenizer: Path, seq_len: int, batch_size: int, num_workers: int, streaming: bool, batches: int
) -> float:
    cfg = load_job_config(
        [
            "--model.hf_assets_path", str(tokenizer),
            "--training.dataset_path", str(dataset),
            "--training.seq_len", str(seq_len),
            "--training.local_batch_size", str(batch_size),
            "--training.dataloader.num_workers", str(num_workers),
            *(["--mot.streaming"] if streaming else []),
        ]
    )
    loader = build_mot_dataloader(1, 0, build_mot_tokenizer(cfg), cfg, infinite=True)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    n_tokens = sum(x["input"].numel() for x, _ in itertools.islice(it, batches))
    return n_tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_mot.benchmark.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="text_image_speech", choices=["text_image", "text_image_speech"])
    parser.add_argument("--dataset", type=Path, help="a MoT dataset directory (overrides --variant)")
    parser.add_argument("--tokenizer", type=Path, default=Path("assets/tokenizer"), help="text tokenizer")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args(argv)
    dataset = args.dataset or Path("assets/demo") / args.variant
    print(f"dataset={dataset} batch={args.batch_size} batches={args.batches}")
    print(f"{'mode':>10} {'workers':>7} {'seq_len':>7} {'tokens/s':>12}")
    for streaming, workers, seq_len in itertools.product([False, True], args.workers, args.seq_len):
        tps = tokens_per_second(dataset, args.tokenizer, seq_len, args.batch_size, workers, streaming, args.batches)
        mode = "streaming" if streaming else "map"
        print(f"{mode:>10} {workers:>7} {seq_len:>7} {tps:>12,.0f}", flush=True)


if __name__ == "__main__":
    main()
