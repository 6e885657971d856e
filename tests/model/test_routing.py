"""Routing: the sort-once permutation and the per-modality matmul it feeds."""

import pytest
import torch

from torchtitan_mot.model.routing import (
    build_routing,
    check_modality_ids,
    ModalityLinear,
    ModalityRMSNorm,
    _RoutedRMSNorm,
    modality_ids_from_masks,
)


@pytest.mark.parametrize("n_mod", [2, 3])
def test_permutation_inverse_and_counts(n_mod: int) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, n_mod, (3, 17))
    r = build_routing(ids, n_mod)
    flat = ids.reshape(-1)
    x = torch.arange(flat.numel())
    assert torch.equal(r.unsort(r.sort(x)), x)
    assert torch.equal(r.sorted_ids, flat[r.order])
    # sorted, and stable inside each modality
    assert bool((r.sorted_ids[1:] >= r.sorted_ids[:-1]).all())
    for m in range(n_mod):
        pos = r.order[r.sorted_ids == m]
        assert bool((pos[1:] > pos[:-1]).all())
    counts = torch.bincount(flat, minlength=n_mod)
    assert r.offsets.tolist() == torch.cumsum(counts, 0).tolist()


def test_empty_modality_and_single_modality() -> None:
    ids = torch.ones(2, 5, dtype=torch.long)  # modality 0 and 2 absent
    r = build_routing(ids, 3)
    assert r.offsets.tolist() == [0, 10, 10]
    lin = ModalityLinear(4, 3, 3)
    x = torch.randn(10, 4)
    y = lin(r.sort(x), r)
    assert torch.allclose(r.unsort(y), x @ lin[1].weight.T)
    y.sum().backward()
    # absent modalities get zero gradients, not None: FSDP reduce-scatters stay in step
    assert lin[0].weight.grad is not None and not lin[0].weight.grad.any()
    assert lin[2].weight.grad is not None and not lin[2].weight.grad.any()
    assert lin[1].weight.grad.abs().sum() > 0


def test_dense_twin_routing_is_identity() -> None:
    r = build_routing(torch.zeros(2, 4, dtype=torch.long), 1)
    assert r.order is None and r.offsets.tolist() == [8]
    x = torch.randn(8, 3)
    assert r.sort(x) is x and r.unsort(x) is x


def test_projections_match_token_by_token_reference() -> None:
    torch.manual_seed(1)
    n_mod, T = 3, 40
    ids = torch.randint(0, n_mod, (2, T // 2))
    r = build_routing(ids, n_mod)
    lin = ModalityLinear(8, 6, n_mod).double()
    norm = ModalityRMSNorm(8, n_mod, eps=1e-6).double()
    with torch.no_grad():
        for n in norm:
            n.weight.uniform_(0.5, 1.5)
    x = torch.randn(T, 8, dtype=torch.float64, requires_grad=True)
    out = r.unsort(lin(norm(r.sort(x), r.sorted_ids), r))
    flat = ids.reshape(-1)
    ref = torch.stack([lin[int(m)](norm[int(m)](x[t])) for t, m in enumerate(flat)])
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    params = [x] + [l.weight for l in lin] + [n.weight for n in norm]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("op", [torch.ops.mot.routed_mm, torch.ops.mot.routed_mm_recompute])
def test_routed_mm_opcheck(op) -> None:
    x = torch.randn(10, 4)
    ws = [torch.randn(3, 4, requires_grad=True) for _ in range(2)]
    torch.library.opcheck(op.default, (x, ws, torch.tensor([4, 10], dtype=torch.int32)))
    ws[1].requires_grad_(False)  # a frozen modality's weight
    torch.library.opcheck(op.default, (x, ws, torch.tensor([4, 10], dtype=torch.int32)))


def test_masks_to_ids_and_errors() -> None:
    text = torch.tensor([[True, True, False, False]])
    image = ~text
    assert modality_ids_from_masks([text, image], torch.Size((1, 4))).tolist() == [[0, 0, 1, 1]]
    with pytest.raises(ValueError, match="overlap"):
        modality_ids_from_masks([text, torch.ones_like(text)], torch.Size((1, 4)))
    with pytest.raises(ValueError, match="in no modality"):
        modality_ids_from_masks([text, torch.zeros_like(text)], torch.Size((1, 4)))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        check_modality_ids(torch.tensor([[0, 2]]), 2)


@pytest.mark.parametrize("shape", [(12, 8), (12, 3, 8)])  # block norm, per-head q/k norm
def test_modality_rms_norm_gradients(shape) -> None:
    """The hand-written backward of the per-modality norm against finite differences."""
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    weight = torch.randn(3, 8, dtype=torch.double, requires_grad=True)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])
    assert torch.autograd.gradcheck(lambda x, w: _RoutedRMSNorm.apply(x, w, ids, 1e-6), (x, weight))


def test_modality_rms_norm_saves_no_more_than_the_dense_norm() -> None:
    """Activation memory: the per-modality norm keeps x and its per-token statistics for
    backward, like the dense twin's fused RMSNorm, not the (T, dim) normalised x or scale."""

    def saved_numel(fn, x: torch.Tensor) -> int:
        saved: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t
        ):
            fn(x)
        return sum(saved)

    x = torch.randn(64, 32, requires_grad=True)
    ids = torch.randint(0, 2, (64,))
    mot, dense = ModalityRMSNorm(32, 2, 1e-6), ModalityRMSNorm(32, 1, 1e-6)
    mot_saved = saved_numel(lambda x: mot(x, ids), x)
    dense_saved = saved_numel(lambda x: dense(x, torch.zeros_like(ids)), x)
    # The extra: the (n_mod, dim) weight stack and the (T,) modality ids.
    assert mot_saved <= dense_saved + 2 * 32 + 64, (mot_saved, dense_saved)
