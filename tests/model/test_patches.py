"""patchify/unpatchify against the contract's patch order, written out element by element."""

import pytest
import torch

from torchtitan_mot.model.patches import patchify, unpatchify


def naive_patchify(latent: torch.Tensor, p: int) -> torch.Tensor:
    """(C, H, W) -> (N, P): patches row-major over the (H/p, W/p) grid, each in (c, py, px) order."""
    c, h, w = latent.shape
    rows = []
    for gy in range(h // p):
        for gx in range(w // p):
            rows.append([float(latent[ci, gy * p + py, gx * p + px])
                         for ci in range(c) for py in range(p) for px in range(p)])
    return torch.tensor(rows)


@pytest.mark.parametrize("shape, p", [((3, 4, 6), 2), ((8, 8, 8), 2), ((1, 6, 3), 3), ((2, 4, 4), 1)])
def test_patch_order_and_exact_round_trip(shape: tuple[int, int, int], p: int) -> None:
    latent = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    patches = patchify(latent, p)
    for b in range(2):
        assert torch.equal(patches[b], naive_patchify(latent[b], p))
    assert torch.equal(unpatchify(patches, shape, p), latent)
    assert torch.equal(unpatchify(patches[0], shape, p), latent[0])  # no batch axis


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="diffusion_patch_size = 2"):
        patchify(torch.zeros(1, 5, 4), 2)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 4, 4\)"):
        unpatchify(torch.zeros(1, 5, 4), (1, 4, 4), 2)
