"""Raw images / audio / text -> a MoT dataset directory (meta.json + parquet shards).

    python -m torchtitan_mot.data.prepare --images DIR --captions captions.jsonl --out DATASET

See docs/data.md. Importable: `prepare(PrepareConfig(...))`, `load_tokenizer(dataset, modality)`.
"""

from .build import PrepareConfig, prepare, shard_count
from .tokenizers import BadInput, ModalityTokenizer, load_tokenizer

__all__ = ["BadInput", "ModalityTokenizer", "PrepareConfig", "load_tokenizer", "prepare", "shard_count"]
