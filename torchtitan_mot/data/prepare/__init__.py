"""Raw images / audio / text -> a MoT dataset directory (meta.json + parquet shards).

    python -m torchtitan_mot.data.prepare --images DIR --captions captions.jsonl --out DATASET

See docs/data.md. Importable: `prepare(PrepareConfig(...))`, `load_tokenizer(dataset, modality)`.
"""

from .build import PrepareConfig, prepare, shard_count
from .latent import LatentEncoder, latent_array, load_latent_encoder
from .tokenizers import BadInput, ModalityTokenizer, load_tokenizer

__all__ = ["BadInput", "LatentEncoder", "ModalityTokenizer", "PrepareConfig", "latent_array", "load_latent_encoder",
           "load_tokenizer", "prepare", "shard_count"]
