"""Multimodal data pipeline: unified vocabulary, packed stateful dataset, dataloaders."""

from .dataloader import build_mot_dataloader, build_mot_validation_dataloader
from .dataset import BadSampleError, MultimodalDataset
from .tokenizer import build_mot_tokenizer, MultimodalTokenizer, VocabLayout

__all__ = [
    "BadSampleError",
    "MultimodalDataset",
    "MultimodalTokenizer",
    "VocabLayout",
    "build_mot_dataloader",
    "build_mot_tokenizer",
    "build_mot_validation_dataloader",
]
