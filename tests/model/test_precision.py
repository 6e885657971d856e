"""Production precision at the model level: autocast, pure bf16, frozen weights.

TorchTitan runs single-device and DDP training under `torch.autocast` (bf16 by default) and
FSDP runs with bf16 parameters. Autocast does not reach inside custom ops, so these tests
check what every per-modality projection actually multiplies, not just the output dtype.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

from torchtitan_mot.model import MoTModelArgs, MoTTransformer
from torchtitan_mot.model.routing import build_routing, ModalityLinear, ModalityRMSNorm

SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, rope_theta=500000,
             max_seq_len=32)
FORWARD_OPS = {"mot.routed_mm.default", "mot.routed_mm_recompute.default"}
MATMULS = FORWARD_OPS | {
    "mot.routed_mm_backward.default", "aten.mm.default", "aten.addmm.default", "aten.bmm.default"
}


class _MatmulDtypes(TorchDispatchMode):
    """Records the operand dtypes of every matmul (the custom op counts as one)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, set[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in MATMULS:
            flat = [a for arg in args for a in (arg if isinstance(arg, list) else [arg])]
            dtypes = {a.dtype for a in flat if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.seen.append((str(func), dtypes))
        return func(*args, **(kwargs or {}))


def _model(n_mod: int = 3, qk_norm: bool = True) -> MoTTransformer:
    torch.manual_seed(0)
    model = MoTTransformer(MoTModelArgs(n_modalities=n_mod, qk_norm=qk_norm, **SHAPE))
    with torch.no_grad():
        model.init_weights()
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_projection_runs_in_the_autocast_dtype(dtype: torch.dtype) -> None:
    model = _model()
    tokens, ids = torch.randint(0, 97, (2, 32)), torch.randint(0, 3, (2, 32))
    with _MatmulDtypes() as mode, torch.autocast("cpu", dtype=dtype):
        out = model(tokens, modality_ids=ids)
    routed = [d for f, d in mode.seen if f in FORWARD_OPS]
    assert len(routed) == 2 * 7, mode.seen  # wq wk wv wo w1 w2 w3 per layer
    assert all(d == {dtype} for _, d in mode.seen), mode.seen
    assert out.dtype == dtype
    with _MatmulDtypes() as mode:
        out.float().sum().backward()
    # (the per-modality norms' backward reduces in fp32 on purpose; not a projection)
    routed = [d for f, d in mode.seen if f == "mot.routed_mm_backward.default"]
    assert len(routed) == 2 * 7 and all(d == {dtype} for d in routed), mode.seen
    # fp32 master weights keep fp32 gradients; every modality was present, so all have one
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in model.parameters())


def _informative_model() -> MoTTransformer:
    """`_model()` with every matrix drawn at unit gain (std 1/sqrt(fan_in)): at the depth-scaled
    init the last layer moves the logits by about one bf16 ulp, so a projection dropped under
    autocast would hide in the bf16 rounding."""
    model = _model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


def test_autocast_matches_fp32_within_bf16_tolerance() -> None:
    """Logits ~4: autocast differs from fp32 by 0.046 at most (measured); dropping any one
    modality's attention or FFN output projection in either layer moves them by >= 2.2."""
    model = _informative_model()
    g = torch.Generator().manual_seed(0)
    tokens, ids = torch.randint(0, 97, (2, 32), generator=g), torch.randint(0, 3, (2, 32), generator=g)
    ref = model(tokens, modality_ids=ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, modality_ids=ids)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.15)


def test_compiled_autocast_has_one_graph_and_matches_eager() -> None:
    """fullgraph compile under autocast: no graph break, no recompile across mixes."""
    model = _model()
    eager = _model()
    backend = CompileCounterWithBackend("aot_eager")
    for block in model.layers.values():
        block.compile(backend=backend, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (2, 32), generator=g)
    mixes = [torch.randint(0, 3, (2, 32), generator=g), torch.zeros(2, 32, dtype=torch.long),
             torch.full((2, 32), 2), (torch.arange(32) > 30).long().expand(2, 32)]
    for ids in mixes:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens, modality_ids=ids)
            ref = eager(tokens, modality_ids=ids)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, ref, rtol=0, atol=0)  # same kernels: bit for bit
        out.float().sum().backward()
    assert backend.frame_count == 1


@pytest.mark.parametrize("shape", [(40, 64), (40, 4, 16)])
def test_bf16_routed_rmsnorm_rounds_once_like_rms_norm(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    norm = ModalityRMSNorm(shape[-1], 3, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        for n in norm:
            n.weight.uniform_(0.5, 1.5)
    ids = torch.randint(0, 3, (shape[0],)).sort().values
    x = torch.randn(shape, dtype=torch.bfloat16)
    out = norm(x, ids)
    for m in range(3):
        rows = ids == m
        expected = F.rms_norm(x[rows], (shape[-1],), norm[m].weight, 1e-5)
        assert torch.equal(out[rows], expected), m


def test_frozen_weights_skip_their_gradient_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    linear = ModalityLinear(8, 6, 3)
    linear[1].weight.requires_grad_(False)
    routing = build_routing(torch.tensor([[0, 1, 2, 1, 0, 2]]), 3)
    x = torch.randn(6, 8, requires_grad=True)
    out = linear(routing.sort(x), routing)
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(a[0].shape) or real_mm(*a, **k))
    out.sum().backward()
    # 3 input-gradient GEMMs + 2 weight-gradient GEMMs (the frozen modality's is skipped)
    assert len(calls) == 5, calls
    assert linear[1].weight.grad is None
    assert linear[0].weight.grad is not None and linear[2].weight.grad is not None
    assert x.grad is not None


def test_weight_subclass_is_refused_naming_the_parameter() -> None:
    model = _model(n_mod=2, qk_norm=False)

    class Odd(torch.Tensor):
        pass

    wq = model.layers["1"].attention.wq
    wq[0].weight = torch.nn.Parameter(wq[0].weight.detach().as_subclass(Odd))
    with pytest.raises(TypeError, match=r"layers\.1\.attention\.wq\.0\.weight is a Odd"):
        model(torch.randint(0, 97, (1, 32)), modality_ids=torch.zeros(1, 32, dtype=torch.long))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_conversion_runs_every_projection_through_float8(recipe: str) -> None:
    """TorchTitan's float8 converter swaps the per-modality Linears for torchao Float8Linear;
    each must then run its own (float8) forward on exactly its modality's tokens, and no
    projection may fall back to the plain routed matmul. Tensorwise runs torchao's emulation
    (as `quantize.linear.float8.emulate`), rowwise torch's float8 matmul on the CPU."""
    from torchao.float8 import convert_to_float8_training, Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    model, reference = _model(qk_norm=False), _model(qk_norm=False)
    config = (Float8LinearConfig(emulate=True) if recipe == "tensorwise"
              else Float8LinearConfig.from_recipe_name(recipe))
    convert_to_float8_training(model, config=config,
                               module_filter_fn=lambda mod, fqn: fqn != "output")
    rows: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, Float8Linear):
            module.register_forward_hook(
                lambda m, args, out, name=name: rows.__setitem__(name, args[0].shape[0]))
    ids = torch.randint(0, 3, (2, 32), generator=torch.Generator().manual_seed(3))
    tokens = torch.randint(0, 97, (2, 32))
    with _MatmulDtypes() as mode, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, modality_ids=ids)
    assert not [f for f, _ in mode.seen if f in FORWARD_OPS]
    counts = torch.bincount(ids.flatten(), minlength=3).tolist()
    linears = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    assert len(linears) == 2 * 7 * 3 and set(rows) == set(linears)
    assert all(rows[n] == counts[int(n.rsplit(".", 1)[1])] for n in linears)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(tokens, modality_ids=ids)
    # measured: one bf16 ulp of the ~4 logits (0.0156) for both recipes
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=0.05)
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
