"""Unified multimodal vocabulary: the text tokenizer's ids first, then one block per
non-text modality (begin marker, end marker, codebook), Chameleon style.

`VocabLayout` is the only place that knows the offsets; the dataset, the model (via
`token_modality_table`) and generation all ask it.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torchtitan.components.tokenizer import BaseTokenizer, HuggingFaceTokenizer
from torchtitan.config import JobConfig

TEXT = "text"


@dataclass(frozen=True)
class VocabLayout:
    """Id ranges of the unified vocabulary.

    Layout: text ids `[0, text_vocab_size)`; then, for each non-text modality in order,
    its begin marker, its end marker and its codebook (`codebook_size` ids).
    """

    text_vocab_size: int
    modalities: tuple[str, ...]
    codebook_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        # Normalise lists (e.g. straight from the job config) so the layout stays hashable.
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "codebook_sizes", tuple(int(s) for s in self.codebook_sizes))
        if self.text_vocab_size <= 0:
            raise ValueError(f"text_vocab_size must be positive, got {self.text_vocab_size}")
        if not self.modalities or self.modalities[0] != TEXT:
            raise ValueError(f"modalities must start with '{TEXT}', got {list(self.modalities)}")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"duplicate modality names in {list(self.modalities)}")
        if len(self.codebook_sizes) != len(self.modalities) - 1:
            raise ValueError(
                f"expected one codebook size per non-text modality {list(self.modalities[1:])}, "
                f"got codebook_sizes={list(self.codebook_sizes)}"
            )
        if any(s < 0 for s in self.codebook_sizes):
            # 0: a continuous (latent) modality, just its markers (config.py checks it is
            # a diffusion modality)
            raise ValueError(f"codebook sizes must be >= 0, got {list(self.codebook_sizes)}")

    @cached_property
    def _block_starts(self) -> dict[str, int]:
        """Id of each non-text modality's begin marker (its block start)."""
        starts, offset = {}, self.text_vocab_size
        for name, size in zip(self.modalities[1:], self.codebook_sizes):
            starts[name] = offset
            offset += 2 + size
        return starts

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + sum(2 + s for s in self.codebook_sizes)

    def modality_index(self, name: str) -> int:
        """Modality id used in `modality_ids` (position in `modalities`)."""
        try:
            return self.modalities.index(name)
        except ValueError:
            raise ValueError(f"unknown modality '{name}', configured: {list(self.modalities)}") from None

    def _non_text(self, modality: str) -> int:
        idx = self.modality_index(modality)
        if idx == 0:
            raise ValueError(f"'{TEXT}' has no markers or codebook; its ids are the text tokenizer's")
        return idx

    def begin_id(self, modality: str) -> int:
        self._non_text(modality)
        return self._block_starts[modality]

    def end_id(self, modality: str) -> int:
        return self.begin_id(modality) + 1

    def codebook_size(self, modality: str) -> int:
        return self.codebook_sizes[self._non_text(modality) - 1]

    def codebook_range(self, modality: str) -> tuple[int, int]:
        """Half-open id range of the modality's codebook (text: the whole text vocabulary)."""
        if self.modality_index(modality) == 0:
            return 0, self.text_vocab_size
        start = self.begin_id(modality) + 2
        return start, start + self.codebook_size(modality)

    def token_modality_table(self) -> torch.LongTensor:
        """Modality index of every id; `table[input]` gives `modality_ids` without branching."""
        table = torch.zeros(self.vocab_size, dtype=torch.long)
        for idx, name in enumerate(self.modalities[1:], start=1):
            table[self.begin_id(name) : self.codebook_range(name)[1]] = idx
        return table


class MultimodalTokenizer(BaseTokenizer):
    """Text tokenizer (torchtitan's `HuggingFaceTokenizer`) plus a `VocabLayout`.

    `encode`/`decode` behave like the text tokenizer so torchtitan code paths keep working;
    `encode_segment`/`decode_segments` handle the unified multimodal vocabulary.
    """

    def __init__(self, hf_assets_path: str, modalities: Sequence[str], codebook_sizes: Sequence[int]):
        super().__init__()
        self.text_tokenizer = HuggingFaceTokenizer(hf_assets_path)
        self.bos_id: int | None = self.text_tokenizer.bos_id
        self.eos_id = self.text_tokenizer.eos_id
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(
                f"tokenizer at {hf_assets_path} needs bos_token and eos_token in tokenizer_config.json: "
                "samples are framed as [bos] ... [eos] for document masking"
            )
        self.layout = VocabLayout(
            text_vocab_size=self.text_tokenizer.get_vocab_size(),
            modalities=tuple(modalities),
            codebook_sizes=tuple(codebook_sizes),
        )
        self._text_special = {self.bos_id, self.eos_id}
        self._modality_table = self.layout.token_modality_table()

    def encode(self, *args: Any, **kwargs: Any) -> list[int]:
        """Plain text, same signature and bos/eos handling as torchtitan's tokenizer."""
        return self.text_tokenizer.encode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """Text ids only; use `decode_segments` for multimodal sequences."""
        return self.text_tokenizer.decode(*args, **kwargs)

    def get_vocab_size(self) -> int:
        return self.layout.vocab_size

    def encode_segment(
        self, modality: str, *, text: str | None = None, tokens: Sequence[int] | None = None
    ) -> list[int]:
        """One segment in unified ids: text without bos/eos, or [begin] + codebook ids + [end]."""
        if self.layout.modality_index(modality) == 0:
            if text is None or tokens is not None:
                raise ValueError(f"a '{TEXT}' segment needs `text` (and no `tokens`)")
            return self.text_tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
        if tokens is None or text is not None:
            raise ValueError(f"a '{modality}' segment needs `tokens` (and no `text`)")
        size = self.layout.codebook_size(modality)
        offset = self.layout.codebook_range(modality)[0]
        out = [self.layout.begin_id(modality)]
        for k, tok in enumerate(tokens):
            if isinstance(tok, bool) or not isinstance(tok, int):
                raise ValueError(f"tokens[{k}]={tok!r} is not an integer id of the '{modality}' codebook [0, {size})")
            if not 0 <= tok < size:
                raise ValueError(f"tokens[{k}]={tok!r} is outside the '{modality}' codebook [0, {size})")
            out.append(tok + offset)
        out.append(self.layout.end_id(modality))
        return out

    def decode_segments(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """Inverse of concatenated `encode_segment` outputs.

        bos/eos are structure, not content, and are dropped (they split text runs). Missing
        begin/end markers are tolerated so truncated generations can still be rendered.
        """
        table = self._modality_table
        segments: list[dict[str, Any]] = []
        current: tuple[int, list[int]] | None = None  # (modality index, raw ids)

        def flush() -> None:
            nonlocal current
            if current is not None:
                idx, run = current
                name = self.layout.modalities[idx]
                if idx == 0:
                    segments.append({"modality": name, "text": self.text_tokenizer.decode(run)})
                else:
                    offset = self.layout.codebook_range(name)[0]
                    segments.append({"modality": name, "tokens": [t - offset for t in run]})
            current = None

        for tok in ids:
            tok = int(tok)
            if not 0 <= tok < self.layout.vocab_size:
                raise ValueError(f"id {tok} is outside the unified vocabulary [0, {self.layout.vocab_size})")
            idx = int(table[tok])
            if idx == 0:
                if tok in self._text_special:
                    flush()
                    continue
                if current is None or current[0] != 0:
                    flush()
                    current = (0, [])
                current[1].append(tok)
                continue
            name = self.layout.modalities[idx]
            if tok == self.layout.begin_id(name):
                flush()
                current = (idx, [])
            elif tok == self.layout.end_id(name):
                if current is None or current[0] != idx:
                    flush()
                    current = (idx, [])
                flush()
            else:
                if current is None or current[0] != idx:
                    flush()
                    current = (idx, [])
                current[1].append(tok)
        flush()
        return segments


def build_mot_tokenizer(job_config: JobConfig) -> MultimodalTokenizer:
    """Text tokenizer from `model.hf_assets_path`, layout from the `[mot]` section, as
    `torchtitan_mot.config.load_job_config` resolved them (paths found, unset modalities and
    codebook sizes taken from the dataset's meta.json)."""
    mot = job_config.mot
    if not mot.modalities:
        raise ValueError(
            "[mot].modalities is not set: load the job config with "
            "torchtitan_mot.config.load_job_config, which takes it from the dataset's meta.json"
        )
    return MultimodalTokenizer(job_config.model.hf_assets_path, mot.modalities, mot.codebook_sizes)
