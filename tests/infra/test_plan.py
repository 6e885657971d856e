"""check_plan (torchtitan_mot.check_plan over the memory model torchtitan_mot.plan): the real sharded model on meta under a fake
process group, and the memory model's formulas."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from torchtitan_mot import mot_args
from torchtitan_mot.check_plan import check_plan, format_plan
from torchtitan_mot.plan import GIB, MEGATRON_BLOCK, USABLE
from torchtitan_mot.model import MoTModelArgs, MoTTransformer

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "train_configs").glob("*.toml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_fits_its_stated_gpus(config: Path) -> None:
    plan = check_plan(["--config", str(config)])
    p = plan.job.parallelism
    assert plan.ngpu == plan.dp_shard * p.data_parallel_replicate_degree * p.tensor_parallel_degree \
        * p.pipeline_parallel_degree * p.context_parallel_degree
    fsdp = plan.dp_shard * p.context_parallel_degree > 1
    for stage in plan.stages:
        # default reshard policy: every block unsharded under PP, two at a time otherwise
        expected = (stage.layers if p.pipeline_parallel_degree > 1 else 2) if fsdp else 0
        assert stage.unsharded_blocks == expected, format_plan(plan)
    assert sum(s.layers for s in plan.stages) == mot_args[plan.job.model.flavor].n_layers
    assert plan.worst.total_gib <= USABLE * plan.gpu_gib, format_plan(plan)


def test_missing_plan_comment_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "no_plan.toml"
    config.write_text((REPO / "train_configs" / "debug_mot.toml").read_text().replace("# check_plan:", "#"))
    with pytest.raises(ValueError, match=f"{config}: expected one '# check_plan:"):
        check_plan(["--config", str(config)])


def test_pp_keeps_every_block_unsharded_and_selective_op_estimate() -> None:
    """Small case by hand: debugmodel, 4 GPUs = FSDP 2 x PP 2, selective op AC."""
    seq_len, local_batch, micro = 256, 4, 1
    plan = check_plan(["--flavor", "debugmodel", "--ngpu", "4", "--pp", "2", "--seq-len", str(seq_len),
                       "--local-batch-size", str(local_batch), "--microbatch-size", str(micro),
                       "--ac", "selective", "--selective-ac-option", "op", "--codebook-sizes", "256"])
    args = copy.deepcopy(mot_args["debugmodel"])
    args.vocab_size = 128256 + 2 + 256  # Llama3 text ids (no tokenizer given) + markers + codebook
    assert plan.vocab.vocab_size == args.vocab_size
    with torch.device("meta"):
        model = MoTTransformer(args)
    block = model.layers["0"]
    block_numel = sum(p.numel() for p in block.parameters())
    head_dim = args.dim // args.n_heads
    wv_out = (args.n_kv_heads or args.n_heads) * head_dim
    ffn_hidden = block.feed_forward.w1[0].weight.shape[0]

    s, h = micro * seq_len, args.dim
    in_flight = min(2, local_batch // micro)
    per_layer = 2 * s * (h + h + wv_out + h + ffn_hidden + h)
    first, last = plan.stages
    assert first.layers + last.layers == args.n_layers
    # bf16 params + fp32 grads of EVERY block of the stage, plus its non-block units
    # (embedding on the first stage, final norm + head on the last), never resharded under PP
    embed = model.tok_embeddings.weight.numel()
    head = model.output.weight.numel() + sum(p.numel() for p in model.norm.parameters())
    for stage, other in ((first, embed), (last, head)):
        assert stage.unsharded_blocks == stage.layers
        assert stage.fsdp_gib * GIB == pytest.approx(6 * (stage.layers * block_numel + other))
    recompute = MEGATRON_BLOCK * s * h
    assert first.act_gib * GIB == pytest.approx(in_flight * first.layers * per_layer + recompute)
    logits = 2 * 4 * s * args.vocab_size
    assert last.act_gib * GIB == pytest.approx(in_flight * last.layers * per_layer + recompute + logits)
    # 16 B of model state per local parameter: FSDP 2 halves every parameter of the model
    total = sum(p.numel() for p in model.parameters())
    assert (first.state_gib + last.state_gib) * GIB == pytest.approx(16 * total / 2, rel=1e-3)


def test_tp_and_pp_shard_every_stage() -> None:
    plan = check_plan(["--flavor", "debugmodel", "--ngpu", "8", "--tp", "2", "--pp", "2",
                       "--seq-len", "256"])
    # stage 0 is simulated on rank 0, stage 1 on rank 4; wq's 256 rows: /2 (TP) then /2 (FSDP)
    assert [(s.stage, s.rank) for s in plan.stages] == [(0, 0), (1, 4)]
    for s in plan.stages:
        assert "sharded 2 ways on dim 0 over tp" in s.sharding, s.sharding
        assert "local (64, 256)" in s.sharding, s.sharding


def test_selective_every_nth_layer_is_between_full_and_none() -> None:
    """Layer SAC 2 on a 5-layer stage: layers 2 and 4 keep their input, 1, 3, 5 everything."""
    from torchtitan.config import JobConfig

    from torchtitan_mot.plan import activation_bytes

    args = mot_args["debugmodel"]
    job = JobConfig()
    job.training.seq_len, job.training.local_batch_size = 128, 2
    s, h = 2 * 128, args.dim

    def act(mode: str, option: str = "op") -> float:
        job.activation_checkpoint.mode, job.activation_checkpoint.selective_ac_option = mode, option
        return activation_bytes(args, job, 5, h, h, 4 * h, has_output=False, vocab_size=1)

    block_none, block_full = MEGATRON_BLOCK * s * h, 2 * s * h
    assert act("none") == 5 * block_none
    assert act("full") == 5 * block_full + block_none
    assert act("selective", "2") == 2 * block_full + 3 * block_none + block_none
    assert act("full") < act("selective", "2") < act("none") + block_none
    with pytest.raises(ValueError, match="activation_checkpoint.mode='memory_budget'"):
        act("memory_budget")


def test_config_untie_reaches_the_plan(tmp_path: Path) -> None:
    """The plan builds the config's model args: `[mot] untie` changes its parameter count."""
    full_config = REPO / "train_configs" / "debug_mot.toml"
    config = tmp_path / "untie_ffn.toml"
    config.write_text(full_config.read_text().replace("[mot]\n", '[mot]\nuntie = ["ffn"]\n'))
    full, ffn = (check_plan(["--config", str(c)]) for c in (full_config, config))
    args = dataclasses.replace(mot_args["debugmodel"], vocab_size=full.vocab.vocab_size, untie=["ffn"])
    assert ffn.stages[0].params == args.param_counts()[0] < full.stages[0].params


def test_flavor_that_does_not_fit_the_config_is_named() -> None:
    config = REPO / "train_configs" / "debug_mot.toml"
    with pytest.raises(ValueError, match=f"{config}: model.flavor 'debugmodel_3modality' has "
                                         r"n_modalities=3 but mot.modalities lists 2"):
        check_plan(["--config", str(config), "--flavor", "debugmodel_3modality"])


def _saved_bytes(args: MoTModelArgs, tokens: torch.Tensor, ids: torch.Tensor) -> int:
    """Bytes of the distinct tensors a bf16 model's forward saves for backward (weights
    excluded), seen through `saved_tensors_hooks`."""
    torch.manual_seed(0)
    model = MoTTransformer(args).to(torch.bfloat16)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, modality_ids=ids)
    return sum(saved.values())


def test_no_ac_estimate_against_measured_saved_tensors() -> None:
    """The no-AC estimate of one block (Megatron's 34 s h bytes) against the bytes a bf16
    debugmodel block really saves for backward on the CPU (flash-style SDPA): measured
    42.3 s h (5 s x h, 4 attention-shaped and 4 s x ffn_hidden tensors). The estimate must not
    claim more than is saved, nor miss more than a quarter of it."""
    from torchtitan.config import JobConfig

    from torchtitan_mot.plan import activation_bytes

    batch, seq_len = 2, 128
    args = dataclasses.replace(mot_args["debugmodel"], vocab_size=300)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (batch, seq_len), generator=g)
    ids = torch.randint(0, args.n_modalities, (batch, seq_len), generator=g)
    one, three = (_saved_bytes(dataclasses.replace(args, n_layers=n), tokens, ids) for n in (1, 3))
    per_block = (three - one) / 2  # embedding, final norm and head cancel
    job = JobConfig()
    job.training.seq_len, job.training.local_batch_size = seq_len, batch
    job.activation_checkpoint.mode = "none"
    h = args.dim
    estimate = activation_bytes(args, job, 1, h, h, 4 * h, has_output=False, vocab_size=1)
    assert 0.75 * per_block <= estimate <= per_block, (estimate, per_block)


def test_report_puts_the_verdict_first_and_placements_in_words() -> None:
    """The verdict is the first line; the assumptions only with --verbose; no DTensor reprs."""
    plan = check_plan(["--flavor", "debugmodel", "--ngpu", "8", "--tp", "2", "--seq-len", "256"])
    report, verbose = format_plan(plan), format_plan(plan, verbose=True)
    assert report.splitlines()[0].startswith("check_plan: fits: the largest rank needs "), report
    assert "assumptions:" not in report and "assumptions:" in verbose
    assert "Shard(" not in report and "sharded 4 ways on dim 0 over fsdp" in report, report
    header = report.splitlines()[2]
    assert "| unsharded blocks |" in header and "| FSDP gathered GiB |" in header, header


def _plan_counts(world_size: int, ep: int, num_experts: int) -> tuple[int, int, int]:
    """(local params, a block's FSDP-gathered params, its gathered expert params) of the
    harness MoE model on meta, FSDP over `world_size` ranks with expert parallel `ep`, as
    plan.py reads them (under the caller's fake process group)."""
    from harness import moe as tiny
    from torchtitan.config import JobConfig
    from torchtitan.distributed import ParallelDims

    from torchtitan_mot.infra.expert_parallel import apply_expert_parallel
    from torchtitan_mot.infra.parallelize import apply_mot_fsdp
    from torchtitan_mot.plan import _numel, unsharded_numel

    dims = ParallelDims(dp_replicate=1, dp_shard=world_size, cp=1, tp=1, pp=1, ep=ep, etp=1,
                        world_size=world_size)
    dims.build_mesh()
    with torch.device("meta"):
        model = tiny.TinyMoEModel(num_experts=num_experts)
    if ep > 1:
        apply_expert_parallel(model, dims.get_mesh("ep"))
    apply_mot_fsdp(model, dims, JobConfig())
    block = model.layers["0"]
    return _numel(model), unsharded_numel(block), unsharded_numel(block.moe["1"].experts)


@pytest.mark.parametrize("ep, e", [(1, 8), (2, 8), (8, 8), (1, 4), (2, 4)])
def test_plan_counts_experts_sharded_by_expert_parallel_and_fsdp(ep: int, e: int) -> None:
    """Analytic: the harness model (dim 16, hidden 32, `e` routed experts, 1 shared, top-2,
    2 layers) on 8 ranks. Every parameter is sharded 8 ways (FSDP x EP; experts on dim 1
    when there are fewer than 8 / ep per rank); an FSDP all-gather of a block restores all
    its dense weights but only this rank's e/ep experts."""
    import torch.distributed as dist
    from harness import moe as tiny

    from torchtitan_mot.compat.cpu import enable_cpu_fallback

    enable_cpu_fallback()
    d, h, v = tiny.DIM, 2 * tiny.DIM, tiny.VOCAB
    experts = e * 3 * d * h
    block_dense = d * d + d * e + 3 * d * h  # dense Linear, router gate, shared expert
    total = v * d + 2 * (block_dense + experts) + d + d * v
    dist.init_process_group("fake", rank=0, world_size=8)
    try:
        local, block, block_experts = _plan_counts(8, ep, e)
    finally:
        dist.destroy_process_group()
    # every weight splits evenly 8 ways but the router gate (e, d): rank 0 holds ceil(e/8) rows
    gate = d * e
    assert local == (total - 2 * gate) // 8 + 2 * -(-e // 8) * d
    assert block_experts == experts // ep
    assert block == block_dense + experts // ep


@pytest.mark.parametrize("flags, message", [
    (["--ngpu", "6", "--ep", "4"], "parallelism.expert_parallel_degree=4 does not divide the 6 ranks"),
    (["--ngpu", "8", "--ep", "8"], "mot.moe_num_experts=4 (at layers.0.feed_forward.moe.0) is not divisible by "
                                   "parallelism.expert_parallel_degree=8"),
])
def test_refused_layout_is_one_line_naming_the_setting(flags: list[str], message: str, capsys) -> None:
    from torchtitan_mot.check_plan import main

    with pytest.raises(SystemExit) as exit:
        main(["--flavor", "debugmodel_hybrid", "--seq-len", "256", *flags])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("check_plan: error: ") and message in err and "\n" not in err, err
