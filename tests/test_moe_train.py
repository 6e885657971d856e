"""MoT + MoE through the trainer: the hybrid debug config trains on CPU and logs expert load;
expert parallel matches FSDP and resumes exactly."""

import pytest
from helpers import checkpoint_tensors

from harness.resume import check_exact_resume
from harness.trainer import REPO, run_trainer, seed_checkpoint, small_args
from torchtitan_mot.run_metrics import read_steps


@pytest.mark.slow
def test_hybrid_debug_config_trains_and_logs_expert_load(tmp_path):
    run = run_trainer([
        "--job.config_file", str(REPO / "train_configs" / "debug_mot_moe.toml"),
        "--training.steps", "12",
        "--training.local_batch_size", "2",
        "--training.seq_len", "128",
        "--job.dump_folder", str(tmp_path),
    ])
    losses = {step: loss for step, (loss, _) in run.steps().items()}
    assert sorted(losses) == list(range(1, 13)), run.log[-3000:]
    assert losses[12] < losses[1] - 1.0, losses
    load = run.scalars("moe/text/max_load")
    assert sorted(load) == list(range(1, 13)) and all(v >= 1.0 for v in load.values())
    shares = [run.scalars(f"moe/text/layer0/expert{j}")[12] for j in range(4)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-5)
    assert "moe/text: max_load" in run.log


MOE_CONFIG = REPO / "train_configs" / "debug_mot_moe.toml"
MOE_STEPS = 3


def _moe_args(dump, *extra: str) -> list[str]:
    """A few deterministic steps of the hybrid debug config (seq 64, batch 2, fp32)."""
    return small_args(dump, MOE_STEPS, "--lr_scheduler.warmup_steps", "2", *extra, config=MOE_CONFIG)


@pytest.fixture(scope="module")
def moe_seed(tmp_path_factory) -> list[str]:
    """Arguments that start a run from one seed checkpoint of the hybrid."""
    return seed_checkpoint(_moe_args(tmp_path_factory.mktemp("moe_seed")))


@pytest.fixture(scope="module")
def moe_single(moe_seed, tmp_path_factory):
    """The one-process eager reference run of the hybrid."""
    return run_trainer(_moe_args(tmp_path_factory.mktemp("moe_single"), *moe_seed))


def _expert_shares(run) -> dict[str, dict[int, float]]:
    """Every logged expert-share scalar (`moe/text/layer<i>/expert<j>`) by tag."""
    return {f"moe/text/layer{i}/expert{j}": run.scalars(f"moe/text/layer{i}/expert{j}")
            for i in range(6) for j in range(4)}


def _assert_same_run(got, ref) -> None:
    """Losses (the console's 5 decimals), grad norms (4), per-modality losses and every
    layer's expert shares equal the reference run's."""
    ref_steps, got_steps = ref.steps(), got.steps()
    assert sorted(got_steps) == sorted(ref_steps) == list(range(1, MOE_STEPS + 1)), got.log[-3000:]
    for step, (loss, grad_norm) in ref_steps.items():
        assert got_steps[step][0] == pytest.approx(loss, abs=1.5e-5), step
        assert got_steps[step][1] == pytest.approx(grad_norm, abs=1.5e-4), step
    for tag in ("loss/text", "loss/image"):
        assert got.scalars(tag) == pytest.approx(ref.scalars(tag), abs=1.5e-5), tag
    for tag, shares in _expert_shares(ref).items():
        assert _expert_shares(got)[tag] == pytest.approx(shares, abs=1e-6), tag


@pytest.mark.slow
def test_hybrid_pipeline_parallel_matches_one_process(moe_seed, moe_single, tmp_path):
    """PP 2 (1F1B, microbatch 1) reproduces one process: losses to the printed 5 decimals,
    grad norms to 4, per-modality losses, and the expert shares of EVERY layer (each stage
    holds three of the six MoE layers; the metrics rank, on the last stage, logs them all)."""
    got = run_trainer(_moe_args(tmp_path, *moe_seed,
                                "--parallelism.pipeline_parallel_degree", "2",
                                "--parallelism.pipeline_parallel_microbatch_size", "1"),
                      nproc=2, log_rank=1)
    _assert_same_run(got, moe_single)


FSDP2 = ["--parallelism.data_parallel_shard_degree", "2"]


@pytest.fixture(scope="module")
def moe_fsdp2(moe_seed, tmp_path_factory):
    """FSDP 2 from the seed: the reference of layouts with two data-parallel ranks (they
    read other batches than one process)."""
    return run_trainer(_moe_args(tmp_path_factory.mktemp("moe_fsdp2"), *moe_seed, *FSDP2), nproc=2)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["--parallelism.tensor_parallel_degree", "2"],
    ["--parallelism.tensor_parallel_degree", "2", "--parallelism.expert_parallel_degree", "2"],
], ids=["tp2", "tp2_ep2"])
def test_hybrid_tensor_parallel_matches_one_process(moe_seed, moe_single, tmp_path, layout):
    """TP 2 + SP (experts sharded on their hidden dim), and expert parallel borrowing the two
    TP ranks (each routes its share of the text tokens), reproduce one process."""
    _assert_same_run(run_trainer(_moe_args(tmp_path, *moe_seed, *layout), nproc=2), moe_single)


@pytest.mark.slow
@pytest.mark.parametrize("layout, nproc, log_rank", [
    (["--parallelism.expert_parallel_degree", "2", "--compile.enable", "--compile.components",
      "model,loss", "--compile.backend", "aot_eager"], 2, 0),
    (["--parallelism.expert_parallel_degree", "2", "--parallelism.pipeline_parallel_degree", "2",
      "--parallelism.pipeline_parallel_microbatch_size", "1"], 4, 3),
], ids=["ep2_compile", "ep2_pp2"])
def test_expert_parallel_with_compile_or_pipeline_matches_fsdp(moe_seed, moe_fsdp2, tmp_path,
                                                               layout, nproc, log_rank):
    """Expert parallel over the two FSDP ranks, with the model compiled (routed experts
    eager), or with two pipeline stages (4 processes), reproduces FSDP 2."""
    got = run_trainer(_moe_args(tmp_path, *moe_seed, *FSDP2, *layout), nproc=nproc, log_rank=log_rank)
    _assert_same_run(got, moe_fsdp2)


EP2 = ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.expert_parallel_degree", "2",
       "--compile.components", "loss"]
LOAD_TAGS = ["moe/text/max_load", *(f"moe/text/layer0/expert{j}" for j in range(4))]


@pytest.mark.slow
def test_expert_parallel_matches_fsdp_and_resumes_exactly(tmp_path):
    """EP 2 x FSDP 2 (experts split across the two ranks by TorchTitan's all-to-all) trains
    the same losses and grad norms as FSDP 2 from one seed checkpoint, and resumes from an
    EP-sharded checkpoint bit for bit: the expert bias (the load-balance state) is restored,
    so the routed load of steps 6-10 is the straight run's."""
    run_trainer(small_args(tmp_path / "seed", 10, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint",
                           config=MOE_CONFIG))
    seed = ["--checkpoint.initial_load_path", str(tmp_path / "seed" / "checkpoint" / "step-0")]
    fsdp = run_trainer(small_args(tmp_path / "fsdp2", 10, *EP2[:2], *EP2[4:], "--checkpoint.enable",
                                  *seed, config=MOE_CONFIG), nproc=2).steps()

    check_exact_resume(tmp_path / "ep", 2, [*EP2, *seed], config=MOE_CONFIG, tags=LOAD_TAGS)
    ep = read_steps(tmp_path / "ep" / "straight")
    assert sorted(ep) == sorted(fsdp) == list(range(1, 11))
    for step, (loss, grad_norm) in fsdp.items():
        assert ep[step][0] == pytest.approx(loss, abs=1.5e-5), step  # the console's 5 decimals
        assert ep[step][1] == pytest.approx(grad_norm, abs=1.5e-4), step
    state = checkpoint_tensors(tmp_path / "ep" / "straight" / "checkpoint" / "step-10")
    bias = [v for k, v in state.items() if k.endswith("feed_forward.moe.0.expert_bias")]
    assert bias and any(b.abs().sum() > 0 for b in bias), "the load-balancing hook never moved the bias"
