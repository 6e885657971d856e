"""MoT + MoE through the trainer: the hybrid debug config trains on CPU and logs expert load;
expert parallel matches FSDP and resumes exactly."""

import pytest
from helpers import checkpoint_tensors

from harness.resume import check_exact_resume
from harness.trainer import REPO, run_trainer, small_args
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
