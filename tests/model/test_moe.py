"""MoE FFN per modality (model/moe.py): TorchTitan's MoE on an MoE modality's sorted slice."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchtitan.models.moe import MoE, MoEArgs

from torchtitan_mot import dense_twin_flavor, mot_args
from torchtitan_mot.model import MoTModelArgs, MoTTransformer
from torchtitan_mot.model.feedforward import MoTFeedForward
from torchtitan_mot.model.moe import MoTMoEFeedForward
from torchtitan_mot.model.routing import build_routing
from torchtitan_mot.trainer.metrics import expert_load_metrics
from torchtitan_mot.trainer.optimizer import build_mot_optimizers
from helpers import modality_optimizer_config

DIM, HIDDEN = 16, 40
SHAPE = dict(dim=32, n_layers=2, n_heads=4, vocab_size=61, rope_theta=500000, max_seq_len=32)
NO_PARALLEL = SimpleNamespace(get_optional_mesh=lambda _: None)  # one process: no loss mesh


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def _moe_args(**kw) -> MoEArgs:
    base = dict(num_experts=4, num_shared_experts=0, top_k=1, score_func="softmax",
                use_grouped_mm=False, load_balance_coeff=1e-3)
    return MoEArgs(**{**base, **kw})


def _ffn(n_sets: int, moe_sets: list[int], **kw) -> MoTMoEFeedForward:
    torch.manual_seed(0)
    ffn = MoTMoEFeedForward(DIM, HIDDEN, n_sets, moe_sets, _moe_args(**kw))
    with torch.no_grad():
        ffn.init_weights(0.1)
    return ffn


def _sorted_stream(counts: list[int]) -> tuple[torch.Tensor, object]:
    ids = torch.cat([torch.full((c,), m) for m, c in enumerate(counts)])
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(1))]
    routing = build_routing(ids.view(1, -1), len(counts))
    x = torch.randn(ids.numel(), DIM, generator=torch.Generator().manual_seed(2))
    return x, routing


def _model(**kw) -> MoTTransformer:
    torch.manual_seed(0)
    model = MoTTransformer(MoTModelArgs(**SHAPE, **kw))
    with torch.no_grad():
        model.init_weights()
    return model


def test_one_expert_is_the_dense_swiglu_of_its_weights() -> None:
    # Softmax over one expert scores every token 1.0: the MoE is that expert's SwiGLU.
    ffn = _ffn(2, [0], num_experts=1)
    x, routing = _sorted_stream([7, 5])
    out = ffn(x, routing)
    e = ffn.moe["0"].experts
    d = ffn.dense
    want = torch.cat([
        _swiglu(x[:7], e.w1[0], e.w2[0], e.w3[0]),
        _swiglu(x[7:], d.w1[0].weight, d.w2[0].weight, d.w3[0].weight),
    ])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("counts", [[6, 9, 5], [6, 0, 5], [0, 9, 0]])
def test_other_modalities_unchanged_by_the_moe(counts: list[int]) -> None:
    """Modalities 0 and 2 dense, 1 an MoE: 0 and 2 compute the MoT FFN of their weights
    (outputs bitwise; input and weight gradients up to float rounding: the dense rows are
    gathered into one buffer), whatever the MoE does."""
    ffn = _ffn(3, [1])
    mot = MoTFeedForward(DIM, HIDDEN, 3)
    with torch.no_grad():
        for proj in ("w1", "w2", "w3"):
            for i, s in enumerate(ffn.dense_sets):
                getattr(mot, proj)[s].weight.copy_(getattr(ffn.dense, proj)[i].weight)
    x, routing = _sorted_stream(counts)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = ffn(xa, routing), mot(xb, routing)
    g = torch.randn_like(out_a)
    (out_a * g).sum().backward()
    (out_b * g).sum().backward()
    ends = routing.offsets.tolist()
    for s in (0, 2):
        rows = slice(ends[s - 1] if s else 0, ends[s])
        assert torch.equal(out_a[rows], out_b[rows])
        torch.testing.assert_close(xa.grad[rows], xb.grad[rows], rtol=1e-6, atol=1e-7)
        for proj in ("w1", "w2", "w3"):
            i = ffn.dense_sets.index(s)
            torch.testing.assert_close(getattr(ffn.dense, proj)[i].weight.grad,
                                       getattr(mot, proj)[s].weight.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("top_k", [1, 2])
def test_expert_counts_are_the_moe_modality_tokens_only(top_k: int) -> None:
    model = _model(n_modalities=3, moe_modalities=[1])
    for layer in model.layers.values():
        layer.feed_forward.moe["1"].router.top_k = top_k
        layer.feed_forward.moe["1"].reorderer.top_k = top_k
    ids = torch.tensor([[0, 1, 2, 1, 1, 0, 2, 1], [2, 2, 0, 1, 0, 0, 2, 2]])
    model(torch.randint(0, 61, ids.shape), ids)
    for layer in model.layers.values():
        assert layer.feed_forward.moe["1"].tokens_per_expert.sum().item() == 5 * top_k


def test_every_moe_runs_even_without_its_tokens() -> None:
    """Expert parallel's all-to-alls need every rank in every MoE call: a forward holding no
    token of an MoE modality still calls its MoE (on an empty slice)."""
    model = _model(n_modalities=2, moe_modalities=[0, 1])
    calls = []
    for module in model.modules():
        if isinstance(module, MoE):
            module.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    ids = torch.ones(2, 8, dtype=torch.long)
    model(torch.randint(0, 61, ids.shape), ids).sum().backward()
    assert sorted(calls) == [(1, 0, 32)] * 2 + [(1, 16, 32)] * 2


def test_bias_moves_after_a_step_and_load_is_recorded() -> None:
    model = _model(n_modalities=2, moe_modalities=[0])
    opt = build_mot_optimizers([model], modality_optimizer_config(), NO_PARALLEL)
    ids = torch.tensor([[0] * 12 + [1] * 4] * 2)
    biases = [layer.feed_forward.moe["0"].expert_bias.clone() for layer in model.layers.values()]
    assert all(b.abs().sum() == 0 for b in biases)
    model(torch.randint(0, 61, ids.shape), ids).sum().backward()
    counts = [layer.feed_forward.moe["0"].tokens_per_expert.clone() for layer in model.layers.values()]
    opt.step()
    for layer, count in zip(model.layers.values(), counts):
        moe = layer.feed_forward.moe["0"]
        # TorchTitan's rule: coeff * sign(mean - count), centred; counts reset afterwards.
        delta = 1e-3 * torch.sign(count.mean() - count)
        torch.testing.assert_close(moe.expert_bias, delta - delta.mean())
        assert moe.expert_bias.abs().sum() > 0
        assert moe.tokens_per_expert.sum() == 0
    load = opt.expert_load.pop()
    assert sorted(load) == [("text", "0"), ("text", "1")]
    assert all(c.sum() == 24 for c in load.values())
    metrics, line = expert_load_metrics(load)
    assert metrics["moe/text/max_load"] >= 1.0 and "moe/text" in line
    assert sum(metrics[f"moe/text/layer0/expert{j}"] for j in range(4)) == pytest.approx(1.0)


def test_expert_bias_is_in_the_state_dict() -> None:
    model = _model(n_modalities=2, moe_modalities=[0])
    state = model.state_dict()
    assert "layers.0.feed_forward.moe.0.expert_bias" in state
    assert "layers.0.feed_forward.moe.0.tokens_per_expert" not in state


def test_bf16_autocast_runs_close_to_fp32() -> None:
    model = _model(n_modalities=2, moe_modalities=[0])
    ids = torch.tensor([[0, 1] * 8, [1, 0] * 8])
    tokens = torch.randint(0, 61, ids.shape)
    ref = model(tokens, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, ids)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize(
    "flavor", ["debugmodel_moe4x", "debugmodel_hybrid", "37M_hybrid", "8B_hybrid", "7B_moe4x"]
)
def test_param_count_and_active_flops(flavor: str) -> None:
    args = copy.deepcopy(mot_args[flavor])
    args.vocab_size, args.max_seq_len = 1000, 64
    with torch.device("meta"):
        model = MoTTransformer(args)
    total, active = args.param_counts()
    nparams, flops = args.get_nparams_and_flops(model, 64)
    assert nparams == total
    hd = args.dim // args.n_heads
    assert flops == 6 * (active - 1000 * args.dim) + 6 * args.n_layers * args.n_heads * 2 * hd * 64
    # FLOP-matched: top-1 of 4 experts is the dense FFN plus the router gate.
    twin = copy.deepcopy(mot_args[dense_twin_flavor(flavor)] if "8B" not in flavor else mot_args["8B_2modality"])
    twin.vocab_size, twin.max_seq_len = 1000, 64
    assert twin.moe_modalities == []
    router = 0 if args.n_modalities > 1 else args.n_layers * args.dim * 4
    assert active - twin.param_counts()[1] == router


def _args(*flags: str) -> MoTModelArgs:
    from torchtitan_mot import build_model_args
    from torchtitan_mot.config import load_job_config

    return build_model_args(load_job_config(["--job.config_file", "debug_mot.toml", *flags], read_data=False))


def test_config_sets_moe_modalities_and_shape() -> None:
    hybrid = _args("--mot.moe_modalities", "image", "--mot.moe_num_experts", "8", "--mot.moe_top_k", "2")
    assert hybrid.moe_modalities == [1]
    assert (hybrid.moe_args.num_experts, hybrid.moe_args.top_k) == (8, 2)
    assert _args("--model.flavor", "debugmodel_hybrid").moe_modalities == [0]
    moe4x = _args("--model.flavor", "debugmodel_moe4x", "--mot.moe_load_balance_coeff", "0")
    assert moe4x.moe_modalities == [0] and moe4x.moe_args.load_balance_coeff is None
    assert _args("--model.flavor", "debugmodel_dense", "--mot.moe_modalities", "text,image").moe_modalities == [0]


@pytest.mark.parametrize("flags, message", [
    (["--mot.moe_modalities", "txt"], r"mot.moe_modalities = \['txt'\]: unknown modality"),
    (["--mot.moe_modalities", "text", "--mot.moe_top_k", "5"], r"mot.moe_top_k = 5: must lie in \[1, num_experts = 4\]"),
    (["--mot.moe_modalities", "text", "--mot.moe_score_func", "relu"], "mot.moe_score_func = 'relu'"),
    (["--mot.moe_modalities", "text", "--mot.moe_num_experts", "0"], "mot.moe_num_experts = 0"),
    (["--mot.moe_modalities", "text", "--mot.moe_load_balance_coeff", "-1"], "mot.moe_load_balance_coeff = -1"),
    (["--mot.moe_modalities", "text", "--mot.frozen_modalities", "text"], r"mot.frozen_modalities \['text'\] have an MoE FFN"),
    (["--mot.moe_modalities", "text", "--mot.untie", "attention,norms"], "mot.moe_modalities = .*shared by all modalities"),
    (["--model.flavor", "debugmodel_dense", "--mot.moe_modalities", "text"], "mot.moe_modalities = .*shared by all modalities"),
    (["--model.flavor", "debugmodel_hybrid", "--mot.untie", "attention,norms"], "flavor 'debugmodel_hybrid' has an MoE FFN"),
])
def test_bad_moe_settings_are_refused_by_name(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _args(*flags)


def test_frozen_moe_modality_without_load_balancing_freezes_experts_and_router() -> None:
    model = _model(n_modalities=2, moe_modalities=[0])
    build_mot_optimizers([model], modality_optimizer_config(frozen_modalities=["text"]), NO_PARALLEL)
    moe = model.layers["0"].feed_forward.moe["0"]
    assert not any(p.requires_grad for p in moe.parameters())
    assert all(p.requires_grad for p in model.layers["0"].feed_forward.dense.parameters())


@pytest.mark.parametrize("other", [dict(moe_modalities=[1]), dict(moe_args=_moe_args(num_experts=8))])
def test_checkpoint_of_another_moe_shape_is_refused_with_the_keys(tmp_path, other: dict) -> None:
    import torch.distributed.checkpoint as dcp

    from torchtitan_mot.trainer.checkpoint_check import check_checkpoint_matches, CheckpointMismatchError

    dcp.save(_model(n_modalities=2, moe_modalities=[0]).state_dict(), checkpoint_id=str(tmp_path), no_dist=True)
    with torch.device("meta"):
        model = MoTTransformer(MoTModelArgs(**SHAPE, n_modalities=2, **{"moe_modalities": [0], **other}))
    with pytest.raises(CheckpointMismatchError) as error:
        check_checkpoint_matches(str(tmp_path), model.state_dict())
    message = str(error.value)
    assert "MoE shape" in message
    if "moe_args" in other:
        assert "layers.0.feed_forward.moe.0.experts.w1: model [8, 256, 32] vs checkpoint [4, 256, 32]" in message
    else:
        assert "layers.0.feed_forward.moe.1.experts.w1" in message and "layers.0.feed_forward.moe.0.experts.w1" in message


def test_upcycled_experts_start_from_the_modality_ffn() -> None:
    from torchtitan_mot.model.state_dict_adapter import upcycle_state_dict

    mot = _model(n_modalities=2).state_dict()
    args = MoTModelArgs(**SHAPE, n_modalities=2, moe_modalities=[0])
    with torch.device("meta"):
        target = MoTTransformer(args).state_dict()
    up = upcycle_state_dict(mot, target, args, seed=3)
    assert sorted(up) == sorted(target)
    for proj in ("w1", "w2", "w3"):
        experts, text = up[f"layers.1.feed_forward.moe.0.experts.{proj}"], mot[f"layers.1.feed_forward.{proj}.0.weight"]
        assert experts.shape[0] == 4
        for e in range(4):
            assert (experts[e] - text).abs().max() < 6 * 0.01 * text.std()
        assert not torch.equal(experts[0], experts[1])  # the noise breaks their symmetry
        assert torch.equal(up[f"layers.1.feed_forward.dense.{proj}.0.weight"], mot[f"layers.1.feed_forward.{proj}.1.weight"])
    assert torch.equal(up["layers.0.attention.wq.1.weight"], mot["layers.0.attention.wq.1.weight"])
    assert torch.equal(up["layers.0.feed_forward.moe.0.expert_bias"], torch.zeros(4))
    again = upcycle_state_dict(mot, target, args, seed=3)
    assert all(torch.equal(up[k], again[k]) for k in up)
    other = upcycle_state_dict(mot, target, args, seed=4)
    assert not torch.equal(up["layers.0.feed_forward.moe.0.router.gate.weight"],
                           other["layers.0.feed_forward.moe.0.router.gate.weight"])


def test_upcycled_single_expert_without_noise_computes_the_mot_model() -> None:
    """Softmax over one expert scores 1.0: upcycling without noise is then exact."""
    from torchtitan_mot.model.state_dict_adapter import upcycle_state_dict

    mot = _model(n_modalities=2)
    args = MoTModelArgs(**SHAPE, n_modalities=2, moe_modalities=[0], moe_args=_moe_args(num_experts=1))
    hybrid = MoTTransformer(args)
    hybrid.load_state_dict(upcycle_state_dict(mot.state_dict(), hybrid.state_dict(), args, noise_scale=0.0))
    ids = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 1, 0, 1, 1]])
    tokens = torch.randint(0, 61, ids.shape)
    torch.testing.assert_close(hybrid(tokens, ids), mot(tokens, ids), rtol=1e-5, atol=1e-5)


def test_upcycling_a_dense_llama3_state_dict_into_moe4x() -> None:
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs

    from torchtitan_mot.model.state_dict_adapter import upcycle_state_dict

    torch.manual_seed(0)
    llama = Transformer(TransformerModelArgs(**SHAPE))
    with torch.no_grad():
        llama.init_weights()
    dense = llama.state_dict()
    args = MoTModelArgs(**SHAPE, n_modalities=1, moe_modalities=[0])
    with torch.device("meta"):
        target = MoTTransformer(args).state_dict()
    up = upcycle_state_dict(dense, target, args)
    assert sorted(up) == sorted(target)
    w1 = dense["layers.0.feed_forward.w1.weight"]
    assert (up["layers.0.feed_forward.moe.0.experts.w1"] - w1).abs().max() < 6 * 0.01 * w1.std()
    assert torch.equal(up["layers.0.attention.wq.0.weight"], dense["layers.0.attention.wq.weight"])
    with pytest.raises(ValueError, match="moe_num_shared_experts = 1"):
        shared = MoTModelArgs(**SHAPE, n_modalities=1, moe_modalities=[0], moe_args=_moe_args(num_shared_experts=1))
        upcycle_state_dict(dense, target, shared)


def test_expert_bias_survives_a_checkpoint_round_trip(tmp_path) -> None:
    """The expert bias (the load-balancing state) is a persistent buffer: TorchTitan's model
    checkpoint (ModelWrapper + DCP) saves it and a resumed model routes with it."""
    import torch.distributed.checkpoint as dcp
    from torchtitan.components.checkpoint import ModelWrapper

    model = _model(n_modalities=2, moe_modalities=[0])
    opt = build_mot_optimizers([model], modality_optimizer_config(), NO_PARALLEL)
    ids = torch.tensor([[0] * 12 + [1] * 4])
    model(torch.randint(0, 61, ids.shape), ids).sum().backward()
    opt.step()
    bias = model.layers["1"].feed_forward.moe["0"].expert_bias.clone()
    assert bias.abs().sum() > 0
    dcp.save(ModelWrapper([model]).state_dict(), checkpoint_id=str(tmp_path), no_dist=True)
    resumed = _model(n_modalities=2, moe_modalities=[0])
    state = ModelWrapper([resumed]).state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path), no_dist=True)
    ModelWrapper([resumed]).load_state_dict(state)
    assert torch.equal(resumed.layers["1"].feed_forward.moe["0"].expert_bias, bias)


@pytest.mark.slow
@pytest.mark.parametrize("n_modalities, moe_modalities", [(2, [0]), (1, [0])], ids=["hybrid", "moe4x"])
def test_compiled_moe_model_matches_eager(n_modalities: int, moe_modalities: list[int]) -> None:
    """`apply_mot_compile` (aot_eager, CPU: for-loop experts run eager between the compiled
    sublayers) gives eager's outputs, gradients and expert counts, for modality mixes that
    include no MoE tokens at all; the compiled graphs have no graph breaks (fullgraph)."""
    from torchtitan.config.job_config import Compile as CompileConfig

    from torchtitan_mot.infra.parallelize import apply_mot_compile

    torch._dynamo.reset()
    eager = _model(n_modalities=n_modalities, moe_modalities=moe_modalities)
    compiled = copy.deepcopy(eager)
    apply_mot_compile(compiled, CompileConfig(enable=True, components=["model"], backend="aot_eager"))
    assert any("_orig_mod" in n for n, _ in compiled.named_parameters())
    tokens = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(3))
    mixes = [torch.randint(0, n_modalities, (2, 16), generator=torch.Generator().manual_seed(4)),
             torch.full((2, 16), n_modalities - 1), torch.zeros(2, 16, dtype=torch.long)]
    for ids in mixes:
        outs = []
        for model in (eager, compiled):
            model.zero_grad()
            out = model(tokens, ids)
            (out.float() ** 2).mean().backward()
            outs.append((out, {n.replace("._orig_mod", ""): p.grad for n, p in model.named_parameters()
                               if p.grad is not None}))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
        assert outs[1][1].keys() == outs[0][1].keys()
        for name, grad in outs[0][1].items():
            torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    for layer, clayer in zip(eager.layers.values(), compiled.layers.values()):
        for s, moe in layer.feed_forward.moe.items():
            assert torch.equal(clayer.feed_forward.moe[s].tokens_per_expert, moe.tokens_per_expert)
