"""MoT + MoE through the trainer: the hybrid debug config trains on CPU and logs expert load."""

import pytest

from harness.trainer import REPO, run_trainer


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
