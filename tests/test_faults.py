"""Bad input and faults: clear errors naming both sides, and no poisoned or clobbered checkpoints."""

import copy
import hashlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from torchtitan_mot.model import MoTModelArgs, MoTTransformer
from torchtitan_mot.trainer.nonfinite_guard import (
    NAN_POLICIES,
    NonFiniteLossError,
    NonFiniteLossGuard,
)
from torchtitan_mot.trainer.loss import ModalityLossStats, MoTLoss
from torchtitan_mot.warm_start import mot_target
from harness.data import repeated_dataset
from helpers import checkpoint_tensors, modality_optimizer_config, optimizer_keys, run_ranks, TINY

from harness.trainer import CONFIG, REPO, run_trainer, small_args

from torchtitan_mot.trainer.optimizer import build_mot_optimizers


def _stats_of_a_nan_image_loss() -> ModalityLossStats:
    stats = ModalityLossStats(["text", "image"])
    pred = torch.zeros(1, 2, 4)
    pred[0, 1, 2] = float("nan")
    MoTLoss(torch.tensor([0, 0, 1, 1]), stats)(pred, torch.tensor([[0, 2]]))  # text finite, image NaN
    return stats


def test_guard_stop_reports_step_and_modalities() -> None:
    guard = NonFiniteLossGuard("stop", _stats_of_a_nan_image_loss())
    guard.step = 3
    guard.record(torch.tensor(1.5))
    assert guard.should_step()  # finite: steps, and resets
    guard.step = 7
    guard.record(torch.tensor(1.5))
    guard.record(torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match=r"step 7: .*\[1\.5, nan\].*'text': 1\.38.*'image': nan"):
        guard.should_step()
    # finite loss, non-finite gradient norm (as clipping computed it): still stopped
    guard.step = 8
    guard.record(torch.tensor(2.0))
    guard.record_grad_norm(torch.tensor(float("inf")))
    with pytest.raises(NonFiniteLossError, match="the loss was finite, the gradients were not"):
        guard.should_step()
    guard.record(torch.tensor(2.0))
    guard.record_grad_norm(torch.tensor(3.0))
    assert guard.should_step()
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        NonFiniteLossGuard("ignore")


def _snapshot(state: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in state.items()}


def _assert_same_state(got: dict, expected: dict) -> None:
    """Same keys, tensors bit-identical, other entries (lr, betas, ...) equal."""
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v, k


def test_guard_skip_leaves_weights_and_optimizer_state() -> None:
    """After a real step (AdamW has moments and a step count), a non-finite step leaves the
    weights and every optimizer state entry bit-identical; the next finite step goes through."""
    torch.manual_seed(0)
    model = MoTTransformer(MoTModelArgs(**TINY))
    with torch.no_grad():
        model.init_weights()
    guard = NonFiniteLossGuard("skip")
    opt = build_mot_optimizers([model], modality_optimizer_config(), None, step_guard=guard)
    tokens, ids = torch.randint(0, 50, (1, 16)), torch.randint(0, 2, (1, 16))

    def train_step(step: int, scale: float) -> None:
        with guard.guarding(step):
            model.zero_grad()
            loss = model(tokens, modality_ids=ids).sum() * scale
            loss.backward()
            guard.record(loss)
            opt.step()

    train_step(1, 1.0)
    model_before, opt_before = _snapshot(model.state_dict()), _snapshot(opt.state_dict())
    assert any(k.endswith("exp_avg") for k in opt_before)
    train_step(2, float("inf"))
    assert guard.skipped_steps == [2]
    _assert_same_state(model.state_dict(), model_before)
    _assert_same_state(opt.state_dict(), opt_before)
    train_step(3, 1.0)  # a finite step goes through
    assert not torch.equal(model_before["output.weight"], model.output.weight)


def _guard_decisions(rank: int, world_size: int) -> dict[str, str]:
    """Each policy's decision on this rank when only the last rank's loss is NaN."""
    decisions = {}
    for policy in NAN_POLICIES:
        guard = NonFiniteLossGuard(policy)
        guard.step = 3
        guard.record(torch.tensor(float("nan") if rank == world_size - 1 else 2.0))
        try:
            decisions[policy] = "step" if guard.should_step() else "skip"
        except NonFiniteLossError:
            decisions[policy] = "stop"
    return decisions


@pytest.mark.slow
def test_guard_decision_agrees_across_ranks(tmp_path: Path) -> None:
    """A NaN on one rank only: every rank stops (or skips) at that step, none steps alone
    (an FSDP rank that stepped while another skipped would diverge or hang)."""
    assert run_ranks(_guard_decisions, 2, tmp_path) == [{"stop": "stop", "skip": "skip"}] * 2


def _nan_run(tmp_path: Path, policy: str, check: bool):
    """lr 1e30: step 1 is finite, its update blows the weights up, step 2's loss is not."""
    dump = tmp_path / policy
    result = run_trainer(small_args(
        dump, 4, "--optimizer.lr", "1e30", "--lr_scheduler.warmup_steps", "0",
        "--checkpoint.enable", "--checkpoint.interval", "1", "--checkpoint.no-last-save-model-only",
        "--mot.nan_policy", policy), check=check)
    return dump / "checkpoint", result.stdout + result.stderr, result.returncode


@pytest.mark.slow
def test_nan_stop_through_entry_point(tmp_path: Path) -> None:
    folder, log, rc = _nan_run(tmp_path, "stop", check=False)
    assert rc != 0
    assert "NonFiniteLossError: non-finite loss or gradients at step 2" in log and "per-modality loss {'text'" in log
    assert sorted(p.name for p in folder.iterdir()) == ["step-1"]  # nothing written after the NaN


@pytest.mark.slow
def test_nan_skip_through_entry_point(tmp_path: Path) -> None:
    folder, log, _ = _nan_run(tmp_path, "skip", check=True)
    assert "non-finite loss or gradients at step 2" in log and "step skipped" in log
    step1, step4 = (checkpoint_tensors(folder / f"step-{step}") for step in (1, 4))
    assert optimizer_keys(step1) and "layers.0.attention.wq.1.weight" in step1
    _assert_same_state(step4, step1)  # steps 2-4 skipped: weights and optimizer state


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, expected",
    [
        (["--mot.modalities", "text,speech", "--mot.codebook_sizes", "256"],
         r"declares modalities \['text', 'image'\] but the config has \[mot\].modalities = \['text', 'speech'\]"),
        (["--mot.modalities", "text,image", "--mot.codebook_sizes", "128"],  # debug_mot.toml sets neither
         r"meta.json.*256.*128|meta.json.*128.*256"),
        (["--model.flavor", "debugmodel_3modality"],
         r"'debugmodel_3modality' has n_modalities=3 but mot.modalities lists 2"),
    ],
)
def test_config_disagreements_fail_at_startup(tmp_path: Path, override: list[str], expected: str) -> None:
    import re

    result = run_trainer(small_args(tmp_path / "run", 2, *override), check=False)
    log = result.stdout + result.stderr
    assert result.returncode != 0 and re.search(expected, log), log[-3000:]
    assert "step:  1" not in log


@pytest.mark.slow
@pytest.mark.parametrize("flavor", ["debugmodel_dense", "debugmodel_3modality"])
def test_checkpoint_of_other_flavor_is_refused(tmp_path: Path, flavor: str) -> None:
    config = CONFIG
    if flavor.endswith("3modality"):
        config = tmp_path / "mot3.toml"
        config.write_text(CONFIG.read_text().replace(
            "[mot]\n", '[mot]\nmodalities = ["text", "image", "speech"]\ncodebook_sizes = [256, 64]\n'))
    other = MoTTransformer(mot_target(config, flavor)[0])
    dcp.save(other.state_dict(), checkpoint_id=str(tmp_path / "other"), no_dist=True)
    before = _tree_hash(tmp_path / "other")
    result = run_trainer(small_args(
        tmp_path / "run", 2, "--checkpoint.enable", "--checkpoint.initial_load_path", str(tmp_path / "other")),
        check=False)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    errors = [l for l in log.splitlines() if "CheckpointMismatchError:" in l]
    assert errors, log[-3000:]
    if flavor == "debugmodel_dense":
        assert "54 model keys missing from the checkpoint: layers.0.attention.wk.1.weight" in errors[-1]
    else:
        assert "54 checkpoint keys the model does not have: layers.0.attention.wk.2.weight" in errors[-1]
        assert "tok_embeddings.weight: model [1282, 256] vs checkpoint [1348, 256]" in errors[-1]
    assert _tree_hash(tmp_path / "other") == before
    assert not (tmp_path / "run" / "checkpoint").exists()


@pytest.mark.slow
def test_corrupt_data_file_leaves_last_checkpoint_intact(tmp_path: Path) -> None:
    """Train 5 steps, cut a row of the data file in half, restart: the run fails before any
    step, and the step-5 checkpoint is byte-for-byte intact (and still loads)."""
    data = repeated_dataset(REPO / "assets" / "demo" / "text_image", tmp_path / "data", jsonl=True)
    args = ["--training.dataset_path", str(data), "--checkpoint.enable", "--checkpoint.interval", "5"]
    run_trainer(small_args(tmp_path / "run", 5, *args))
    step5 = tmp_path / "run" / "checkpoint" / "step-5"
    before = _tree_hash(step5)
    rows = (data / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(rows[:80] + [rows[80][: len(rows[80]) // 2]]) + "\n")
    result = run_trainer(small_args(tmp_path / "run", 10, *args), check=False)
    log = result.stdout + result.stderr
    assert result.returncode != 0 and "JSON parse error" in log and "step:  6" not in log
    assert _tree_hash(step5) == before
    assert sorted(p.name for p in step5.parent.iterdir()) == ["step-5"]


@pytest.mark.slow
def test_unreadable_data_file_is_named(tmp_path: Path) -> None:
    data = repeated_dataset(REPO / "assets" / "demo" / "text_image", tmp_path / "data", jsonl=True)
    rows = (data / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(rows[:40] + [rows[40][:30]]) + "\n")
    result = run_trainer(small_args(tmp_path / "run", 3, "--training.dataset_path", str(data)),
                         check=False)
    errors = [l for l in (result.stdout + result.stderr).splitlines() if "Error:" in l and "[rank0]" in l]
    assert result.returncode != 0 and errors
    assert str(data / "train.jsonl") in errors[-1], errors[-1]


def test_pipeline_stage_accepts_other_stages_keys_but_not_wrong_shapes(tmp_path: Path) -> None:
    """A pipeline stage holds part of the model: the checkpoint's other layers are expected,
    its own keys must still be there with the right shapes."""
    import torch
    import torch.distributed.checkpoint as dcp

    from torchtitan_mot.trainer.checkpoint_check import check_checkpoint_matches, CheckpointMismatchError

    full = {"layers.0.attention.wq.0.weight": torch.zeros(4, 4),
            "layers.1.attention.wq.0.weight": torch.zeros(4, 4)}
    dcp.save(full, checkpoint_id=str(tmp_path))
    stage = {"layers.1.attention.wq.0.weight": torch.zeros(4, 4)}
    check_checkpoint_matches(str(tmp_path), stage, stage_only=True)
    with pytest.raises(CheckpointMismatchError, match="checkpoint keys the model does not have"):
        check_checkpoint_matches(str(tmp_path), stage)
    with pytest.raises(CheckpointMismatchError, match=r"model \[4, 8\] vs checkpoint \[4, 4\]"):
        check_checkpoint_matches(str(tmp_path), {"layers.1.attention.wq.0.weight": torch.zeros(4, 8)},
                                 stage_only=True)
