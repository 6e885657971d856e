"""Latent images <-> transformer positions: the one definition of the patch order.

A (C, H, W) latent becomes (H/p * W/p) positions of P = C * p * p values: patches in
row-major order over the (H/p, W/p) grid, each flattened in (c, py, px) order (the
Transfusion contract). The data pipeline patchifies what it stores; generation unpatchifies
what the sampler returns. It lives in model/ so both can import it (model/ imports nothing
from data/).
"""

import torch


def _grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    if patch_size < 1 or height % patch_size or width % patch_size:
        raise ValueError(
            f"mot.diffusion_patch_size = {patch_size} does not divide the latent's {height}x{width} "
            "spatial size"
        )
    return height // patch_size, width // patch_size


def patchify(latent: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(..., C, H, W) -> (..., H/p * W/p, C * p * p)."""
    *lead, c, h, w = latent.shape
    gh, gw = _grid(h, w, patch_size)
    p = patch_size
    x = latent.reshape(*lead, c, gh, p, gw, p)
    n = len(lead)
    # (..., c, gh, py, gw, px) -> (..., gh, gw, c, py, px)
    x = x.permute(*range(n), n + 1, n + 3, n, n + 2, n + 4)
    return x.reshape(*lead, gh * gw, c * p * p)


def unpatchify(patches: torch.Tensor, shape: tuple[int, int, int], patch_size: int) -> torch.Tensor:
    """(..., H/p * W/p, C * p * p) -> (..., C, H, W) for a latent of `shape` (C, H, W);
    the exact inverse of `patchify`."""
    c, h, w = shape
    gh, gw = _grid(h, w, patch_size)
    p = patch_size
    *lead, n_pos, dim = patches.shape
    if (n_pos, dim) != (gh * gw, c * p * p):
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not tile a {c}x{h}x{w} latent in {p}x{p} "
            f"patches: expected (..., {gh * gw}, {c * p * p})"
        )
    n = len(lead)
    x = patches.reshape(*lead, gh, gw, c, p, p)
    # (..., gh, gw, c, py, px) -> (..., c, gh, py, gw, px)
    x = x.permute(*range(n), n + 2, n, n + 3, n + 1, n + 4)
    return x.reshape(*lead, c, h, w)
