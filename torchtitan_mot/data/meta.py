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


LATENT_DTYPES = ("float16", "bfloat16")


def meta_latents(meta_path: Path, meta: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """meta.json's `latents` (modality -> {"shape": [C, H, W], "dtype", "encoder"}): the
    modalities stored as continuous latents (the Transfusion setting), checked."""
    meta = read_meta(meta_path) if meta is None else meta
    latents = meta.get("latents") or {}
    if not isinstance(latents, dict):
        raise ValueError(f"{meta_path}: 'latents' must map modality -> entry, got {type(latents).__name__}")
    for name, entry in latents.items():
        where = f"{meta_path}: latents.{name}"
        if name not in list(meta.get("modalities", []))[1:]:
            raise ValueError(f"{where}: {name!r} is not a non-text modality of 'modalities' {meta.get('modalities')}")
        if name in (meta.get("codebook_sizes") or {}):
            raise ValueError(f"{where}: a modality has either a codebook or latents, {name!r} has both")
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and len(shape) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise ValueError(f"{where}.shape must be [C, H, W] of positive integers, got {shape!r}")
        if entry.get("dtype") not in LATENT_DTYPES:
            raise ValueError(f"{where}.dtype must be one of {LATENT_DTYPES}, got {entry.get('dtype')!r}")
    return latents


def _codebooks(meta_path: Path, meta: dict[str, Any]) -> dict[str, int]:
    """Codebook size of every non-text modality; 0 for a latent one (only its markers)."""
    latents = meta_latents(meta_path, meta)
    try:
        return {m: 0 if m in latents else int(meta["codebook_sizes"][m]) for m in list(meta["modalities"])[1:]}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: no usable 'modalities'/'codebook_sizes' ({e!r})") from None


def meta_modalities(meta_path: Path) -> tuple[list[str], list[int]]:
    """(modalities, codebook size of each non-text modality) that meta.json declares; a
    latent modality's size is 0."""
    meta = read_meta(meta_path)
    try:
        modalities = list(meta["modalities"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{meta_path}: no usable 'modalities'/'codebook_sizes' ({e!r})") from None
    return modalities, list(_codebooks(meta_path, meta).values())


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
    expected = dict(zip(modalities[1:], codebook_sizes))
    latents = meta_latents(meta_path, meta)
    declared = {**(meta.get("codebook_sizes") or {}), **{m: 0 for m in latents}}  # a latent modality: 0
    shown = declared if latents else meta.get("codebook_sizes")
    if shown != expected:
        fix = " ".join(str(declared.get(m, "?")) for m in modalities[1:])
        raise ValueError(
            f"{meta_path} declares codebook_sizes {shown} "
            f"but the config has [mot].codebook_sizes = {list(codebook_sizes)} "
            f"(i.e. {expected}): pass --mot.codebook_sizes {fix} (or leave [mot].codebook_sizes "
            "unset to take it from meta.json)"
        )
