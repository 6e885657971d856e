"""Where a MoT dataset lives and what its `meta.json` declares.

A dataset path is a local folder or a HuggingFace Hub name; one that looks local is never
sent to the Hub (a typo would otherwise cost a minute of Hub retries).

`torchtitan_mot.config` resolves a job config against it once; the dataset checks it again
when it opens the data (a dataset may be built without a job config).
"""

import json
import os
from pathlib import Path
from typing import Any


def looks_local(path: str) -> bool:
    """True for a path meant as a local folder: it exists, starts with "." or "/" (or "~"),
    or its first component exists here (`data/mine` when `data/` does)."""
    if path.startswith((".", "/", "~")) or os.path.exists(path):
        return True
    first, sep, _ = path.partition("/")
    return bool(sep) and os.path.exists(first)


def missing_dataset(path: str, flag: str) -> str:
    """The one-line error for a local dataset folder that is not there."""
    return (f"{flag} {path}: no such folder (looked in {Path(path).expanduser().absolute()}; "
            f"working directory {os.getcwd()})")


def read_meta(meta_path: Path) -> dict[str, Any]:
    """A dataset's meta.json; a file that is not a JSON object is named in the error."""
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def meta_modalities(meta_path: Path) -> tuple[list[str], list[int]]:
    """(modalities, codebook size of each non-text modality) that meta.json declares."""
    meta = read_meta(meta_path)
    latents = meta.get("latents") or {}
    try:
        modalities = list(meta["modalities"])
        return modalities, [
            0 if m in latents else int(meta["codebook_sizes"][m]) for m in modalities[1:]
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: no usable 'modalities'/'codebook_sizes' ({e!r})") from None


def check_meta(meta_path: Path, modalities: list[str], codebook_sizes: list[int]) -> None:
    """`meta.json` must describe exactly the configured modalities and codebooks; the error
    names the flag that makes the config agree."""
    meta = read_meta(meta_path)
    if list(meta.get("modalities", [])) != list(modalities):
        raise ValueError(
            f"{meta_path} declares modalities {meta.get('modalities')} "
            f"but the config has [mot].modalities = {list(modalities)}: leave [mot].modalities "
            "and [mot].codebook_sizes unset to take them from meta.json, or use a dataset "
            "with these modalities"
        )
    latents = meta.get("latents") or {}
    expected = {m: s for m, s in zip(modalities[1:], codebook_sizes) if m not in latents}
    bad = [m for m, s in zip(modalities[1:], codebook_sizes) if m in latents and s != 0]
    if bad:
        raise ValueError(
            f"{meta_path} declares {bad} as continuous latents but [mot].codebook_sizes gives "
            f"them a codebook ({list(codebook_sizes)}): a latent modality's codebook size is 0"
        )
    if (meta.get("codebook_sizes") or {}) != expected:
        declared = meta.get("codebook_sizes") or {}
        fix = " ".join(str(declared.get(m, "?")) for m in modalities[1:])
        raise ValueError(
            f"{meta_path} declares codebook_sizes {meta.get('codebook_sizes')} "
            f"but the config has [mot].codebook_sizes = {list(codebook_sizes)} "
            f"(i.e. {expected}): pass --mot.codebook_sizes {fix} (or leave [mot].codebook_sizes "
            "unset to take it from meta.json)"
        )


def meta_latents(meta_path: Path) -> dict[str, tuple[int, int, int]]:
    """The latent shape (C, H, W) of each continuous modality meta.json declares
    (`"latents": {modality: {"shape": [C, H, W], ...}}`); empty for a discrete dataset."""
    meta = read_meta(meta_path)
    out = {}
    for name, entry in (meta.get("latents") or {}).items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and len(shape) == 3
                and all(isinstance(v, int) and v > 0 for v in shape)):
            raise ValueError(
                f"{meta_path}: latents.{name}.shape must be [C, H, W] positive ints, got {shape!r}"
            )
        out[name] = (shape[0], shape[1], shape[2])
    return out
