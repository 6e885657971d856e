"""The MoT validator against a hand computation of per-modality cross-entropy.

The oracle assigns each target token its modality from the vocabulary's id ranges
(`VocabLayout`), not from the loss's lookup table, and averages plain `F.cross_entropy`.
"""

import contextlib
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims, utils as dist_utils

from torchtitan_mot.config import load_job_config
from torchtitan_mot.data.dataloader import build_mot_validation_dataloader
from torchtitan_mot.data.tokenizer import build_mot_tokenizer, VocabLayout
from torchtitan_mot.compat.cpu import enable_cpu_fallback
from torchtitan_mot.trainer.loss import build_mot_loss
from torchtitan_mot.model import MoTModelArgs, MoTTransformer
from torchtitan_mot.trainer.validate import build_mot_validator

from harness.trainer import run_trainer
from helpers import run_ranks

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo" / "text_image"
STEPS = 3


def make_config() -> JobConfig:
    return load_job_config([
        "--model.hf_assets_path", str(ROOT / "assets" / "tokenizer"),
        "--training.seq_len", "32",
        "--validation.dataset_path", str(DEMO),
        "--validation.seq_len", "32",
        "--validation.local_batch_size", "2",
        "--validation.steps", str(STEPS),
    ])


def tiny_model(vocab_size: int) -> MoTTransformer:
    torch.manual_seed(0)
    model = MoTTransformer(MoTModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=vocab_size,
                                        n_modalities=2, max_seq_len=32))
    with torch.no_grad():
        model.init_weights()
    return model


def hand_losses(model: MoTTransformer, batches: list, layout: VocabLayout) -> dict[str, float]:
    sums = {"text": 0.0, "image": 0.0}
    counts = {"text": 0, "image": 0}
    lo = layout.begin_id("image")
    hi = layout.codebook_range("image")[1]
    with torch.no_grad():
        for x, y in batches:
            logits = model(x["input"], modality_ids=x["modality_ids"])
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
            image = (y.flatten() >= lo) & (y.flatten() < hi)
            for name, mask in (("image", image), ("text", ~image)):
                sums[name] += ce[mask].sum().item()
                counts[name] += int(mask.sum())
    out = {"validation/loss": sum(sums.values()) / sum(counts.values())}
    out.update({f"validation/loss/{m}": sums[m] / counts[m] for m in sums})
    return out


class RecordingMetrics:
    """The two members of `MetricsProcessor` the validator touches."""

    def __init__(self) -> None:
        self.ntokens_since_last_log = 0
        self.logged: list[tuple[float, int, dict[str, Any]]] = []

    def log_validation(self, loss: float, step: int, extra_metrics: dict[str, Any]) -> None:
        self.logged.append((loss, step, extra_metrics))


def run_validator(rank: int, world_size: int) -> tuple:
    """Build the validator as the Trainer does (dp_shard = world_size), validate twice
    (in the caller's process group, or a one-rank one)."""
    enable_cpu_fallback()
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world_size, store=dist.HashStore())
    cfg = make_config()
    tok = build_mot_tokenizer(cfg)
    dims = ParallelDims(dp_replicate=1, dp_shard=world_size, cp=1, tp=1, pp=1, ep=1, etp=1,
                        world_size=world_size)
    train_loss = build_mot_loss(cfg)
    metrics = RecordingMetrics()
    validator = build_mot_validator(
        job_config=cfg, dp_world_size=world_size, dp_rank=rank, tokenizer=tok,
        parallel_dims=dims, loss_fn=train_loss,
        validation_context=dist_utils.get_train_context(False),
        maybe_enable_amp=contextlib.nullcontext(), metrics_processor=metrics,
    )
    model = tiny_model(tok.get_vocab_size())
    # Pending training stats must come through validation untouched.
    train_loss(torch.zeros(1, 3, tok.get_vocab_size()), torch.tensor([[5, 6, 7]]))
    first = validator.validate([model], step=10)
    second = validator.validate([model], step=20)
    sums, counts = train_loss.stats.pop()
    assert counts.tolist() == [3.0, 0.0] and model.training
    return first, second, metrics.logged


def dataloader_batches(world_size: int) -> list:
    cfg = make_config()
    tok = build_mot_tokenizer(cfg)
    return [
        batch
        for rank in range(world_size)
        for batch in list(build_mot_validation_dataloader(world_size, rank, tok, cfg))[:STEPS]
    ]


@pytest.fixture
def single_process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_per_modality_loss_matches_hand_computation(single_process_group) -> None:
    first, second, logged = run_validator(0, 1)
    tok = build_mot_tokenizer(make_config())
    expected = hand_losses(tiny_model(tok.get_vocab_size()), dataloader_batches(1), tok.layout)
    assert first.keys() == expected.keys()
    for key in expected:
        assert first[key] == pytest.approx(expected[key], rel=1e-5), key
    assert second == first  # the split is rewound: every validation sees the same batches
    assert [(loss, step) for loss, step, _ in logged] == [(first["validation/loss"], 10),
                                                          (second["validation/loss"], 20)]
    assert logged[0][2] == first


@pytest.mark.slow
def test_data_parallel_ranks_reduce_sums_and_counts(tmp_path: Path) -> None:
    """Two gloo ranks, each on its half of the split: every rank gets the global
    token-weighted mean (a reduce to rank 0 alone would leave rank 1 its local mean)."""
    per_rank = [first for first, _, _ in run_ranks(run_validator, 2, tmp_path)]
    cfg = make_config()
    tok = build_mot_tokenizer(cfg)
    expected = hand_losses(tiny_model(tok.get_vocab_size()), dataloader_batches(2), tok.layout)
    for rank, got in enumerate(per_rank):
        assert got.keys() == expected.keys(), rank
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-5), (rank, key)


@pytest.mark.slow
def test_trainer_logs_validation_losses_to_tensorboard(tmp_path: Path) -> None:
    """`--validation.enable` wires the validator into the real trainer and TensorBoard."""
    run = run_trainer([
        "--job.config_file", str(ROOT / "train_configs" / "debug_mot.toml"),
        "--job.dump_folder", str(tmp_path),
        "--training.steps", "2", "--training.seq_len", "64", "--training.local_batch_size", "2",
        "--validation.enable", "--validation.freq", "2", "--validation.steps", "1",
        "--validation.seq_len", "64", "--validation.local_batch_size", "2",
    ], timeout=300)
    # the validator's per-modality line: 5 decimals for the loss and each modality
    console = {int(m[0]): dict(zip(("loss", "text", "image"), map(float, m[1:]))) for m in re.findall(
        r"validate step:\s*(\d+)\s+loss:\s*(\S+)\s+loss/text:\s*(\S+)\s+loss/image:\s*(\S+)", run.log)}
    assert sorted(console) == [1, 2], run.log[-3000:]
    for tag, key in (("validation/loss", "loss"), ("validation/loss/text", "text"),
                     ("validation/loss/image", "image")):
        values = run.scalars(tag)
        assert sorted(values) == [1, 2], tag
        for step, value in values.items():
            assert math.isfinite(value) and 0 < value < 20, (tag, step, value)
            assert abs(value - console[step][key]) <= 5e-6 + 1e-6 * value, (tag, step, value, console)
