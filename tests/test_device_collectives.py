"""Every tensor that reaches a collective lives on the training device.

NCCL only reduces GPU tensors; gloo accepts host tensors, so a CPU run hides a host tensor
that a GPU run would crash on. Here the "training device" is `meta`, and each collective is
replaced by a spy that records the device of what it is given: a host tensor fails the test.
Covered: per-modality loss stats (also on a pipeline stage that never computes the loss),
the metrics all-reduce, the validator's reduce and the non-finite guard's flag.
"""

from types import SimpleNamespace

import pytest
import torch

import torchtitan_mot.trainer.metrics as metrics_module
import torchtitan_mot.trainer.validate as validate_module
from torchtitan_mot.trainer.loss import ModalityLossStats, MoTLoss
from torchtitan_mot.trainer.metrics import MoTMetricsProcessor
from torchtitan_mot.trainer.nonfinite_guard import NonFiniteLossGuard
from torchtitan_mot.trainer.validate import MoTValidator

META = torch.device("meta")
TABLE = torch.tensor([0, 0, 1, 1])


class _Spy:
    """Stands in for `funcol.all_reduce`: records input devices and returns ones, on the
    input's device or (to let a caller read the result) on the host."""

    def __init__(self, keep_device: bool) -> None:
        self.keep_device = keep_device
        self.devices: list[torch.device] = []

    def __call__(self, tensor: torch.Tensor, reduceOp: str, group) -> torch.Tensor:
        self.devices.append(tensor.device)
        return torch.ones(tensor.shape, device=tensor.device if self.keep_device else "cpu")


def _parallel_dims(*meshes: str) -> SimpleNamespace:
    return SimpleNamespace(get_optional_mesh=lambda name: object() if name in meshes else None)


def test_stage_without_the_loss_pops_stats_on_the_training_device() -> None:
    loss = MoTLoss(TABLE, ModalityLossStats(["text", "image"], META))
    sums, counts = loss.stats.pop()  # never called: a pipeline stage without the loss
    assert sums.device == META and counts.device == META
    assert loss.token_modality.device == META and loss.weights.device == META


def test_metrics_all_reduce_gets_device_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(keep_device=False)
    monkeypatch.setattr(metrics_module.funcol, "all_reduce", spy)
    processor = MoTMetricsProcessor.__new__(MoTMetricsProcessor)
    processor.parallel_dims = _parallel_dims("loss")
    processor.loss_stats = ModalityLossStats(["text", "image"], META)
    assert processor.modality_losses() == {"text": 1.0, "image": 1.0}
    assert spy.devices == [META]


def test_validator_reduce_gets_device_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(keep_device=True)
    monkeypatch.setattr(validate_module.funcol, "all_reduce", spy)
    validator = MoTValidator.__new__(MoTValidator)
    validator.parallel_dims = _parallel_dims("loss", "pp")
    validator.loss_stats = ModalityLossStats(["text", "image"], META)
    sums, counts = validator.loss_stats.pop()
    validator._reduce(torch.stack([sums, counts]))
    assert spy.devices == [META, META]


def test_nonfinite_guard_flag_is_reduced_on_the_training_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[torch.device] = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce",
                        lambda t, op=None, group=None: seen.append(t.device))
    guard = NonFiniteLossGuard("stop")
    guard.record(torch.tensor(1.0, device=META))
    guard.record_grad_norm(torch.tensor(2.0, device=META))
    with pytest.raises(NotImplementedError):  # the host read of a meta flag; the point is below
        guard.should_step()
    assert seen == [META]
