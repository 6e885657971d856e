"""Frozen modalities stay bitwise unchanged; per-modality LR multipliers hold through the schedule."""

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchtitan.components.lr_scheduler import build_lr_schedulers, LRSchedulersContainer
from torchtitan.config import LRScheduler as LRSchedulerConfig

from torchtitan_mot.model import MoTModelArgs, MoTTransformer
from torchtitan_mot.model.routing import ModalityLinear, ModalityRMSNorm
from torchtitan_mot.warm_start import mot_target
from torchtitan_mot.trainer.optimizer import (
    build_mot_optimizers,
    MoTOptimizersContainer,
)

from helpers import modality_optimizer_config, TINY
from harness.trainer import CONFIG, run_trainer, small_args


def _modality_of(model: torch.nn.Module) -> dict[str, int | None]:
    """Parameter name -> modality id (None: shared), from the module structure."""
    out: dict[str, int | None] = {name: None for name, _ in model.named_parameters()}
    for mname, module in model.named_modules():
        if isinstance(module, (ModalityLinear, ModalityRMSNorm)) and len(module) > 1:
            for m, child in enumerate(module):
                for pname, _ in child.named_parameters():
                    out[f"{mname}.{m}.{pname}"] = m
    return out



def test_groups_lr_schedule_and_state_dict() -> None:
    torch.manual_seed(0)
    model = MoTTransformer(MoTModelArgs(**TINY))
    with torch.no_grad():
        model.init_weights()
    opt = build_mot_optimizers([model], modality_optimizer_config(frozen_modalities=["image"], lr_multipliers=[1.0, 0.5]), None)
    assert isinstance(opt, MoTOptimizersContainer)
    modality = _modality_of(model)
    params = dict(model.named_parameters())
    in_opt = {id(p) for g in opt.optimizers[0].param_groups for p in g["params"]}
    for name, m in modality.items():
        assert (id(params[name]) in in_opt) == (m != 1), name
        assert params[name].requires_grad == (m != 1), name
    assert [g["lr"] for g in opt.optimizers[0].param_groups] == [1e-2, 1e-2]  # shared, text

    # multipliers survive warmup/decay: every group follows the same lambda
    def build(model: MoTTransformer) -> tuple[MoTOptimizersContainer, LRSchedulersContainer]:
        opt = build_mot_optimizers([model], modality_optimizer_config(lr_multipliers=[1.0, 0.25]), None)
        return opt, build_lr_schedulers(opt, LRSchedulerConfig(warmup_steps=2, decay_type="cosine"), 10)

    def step_and_check(*runs: tuple[MoTOptimizersContainer, LRSchedulersContainer]) -> list[float]:
        for opt, sched in runs:
            opt.step()
            sched.step()
        lrs = [g["lr"] for g in runs[0][0].optimizers[0].param_groups]
        assert all([g["lr"] for g in opt.optimizers[0].param_groups] == lrs for opt, _ in runs)
        assert lrs[2] == pytest.approx(0.25 * lrs[0]) and lrs[1] == lrs[0] > 0
        return lrs

    opt, sched = build(MoTTransformer(MoTModelArgs(**TINY)))
    for _ in range(4):
        lrs = step_and_check((opt, sched))
    # Resume from a checkpoint (optimizer and scheduler state into fresh ones): the lrs go on
    # exactly as without the interruption, through the rest of warmup/decay.
    fresh, fresh_sched = build(opt.model_parts[0])
    fresh.load_state_dict(opt.state_dict())
    assert [g["lr"] for g in fresh.optimizers[0].param_groups] == lrs
    fresh_sched.load_state_dict(sched.state_dict())
    for _ in range(5):  # to step 9 of 10 (the cosine reaches 0 at step 10)
        step_and_check((opt, sched), (fresh, fresh_sched))


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"frozen_modalities \['speech'\] are not in mot.modalities"):
        modality_optimizer_config(frozen_modalities=["speech"])
    with pytest.raises(ValueError, match="lr_multipliers has 3 entries but mot.modalities has 2"):
        modality_optimizer_config(lr_multipliers=[1.0, 1.0, 1.0])
    dense = MoTTransformer(MoTModelArgs(**{**TINY, "n_modalities": 1}))
    with pytest.raises(ValueError, match="no per-modality weights: they need an MoT flavor"):
        build_mot_optimizers([dense], modality_optimizer_config(frozen_modalities=["image"]), None)


def test_untie_subset_freezes_only_untied_copies() -> None:
    """With `untie=["ffn"]` the single-copy attention and norms are shared: freezing image
    leaves them trainable at the base lr; only the image FFN copies are frozen."""
    model = MoTTransformer(MoTModelArgs(**TINY, untie=["ffn"]))
    opt = build_mot_optimizers([model], modality_optimizer_config(frozen_modalities=["image"], lr_multipliers=[0.5, 1.0]), None)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"layers.{i}.feed_forward.{w}.1.weight" for i in (0, 1) for w in ("w1", "w2", "w3")}
    shared, text = opt.optimizers[0].param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert (shared["lr"], text["lr"]) == (1e-2, 5e-3)
    assert {names[id(p)] for p in text["params"]} == {
        f"layers.{i}.feed_forward.{w}.0.weight" for i in (0, 1) for w in ("w1", "w2", "w3")}
    assert "layers.0.attention.wq.0.weight" in {names[id(p)] for p in shared["params"]}


def test_dense_twin_without_per_modality_settings_gets_one_group() -> None:
    """The dense twin trains on two-modality data: no per-modality settings, no error."""
    dense = MoTTransformer(MoTModelArgs(**{**TINY, "n_modalities": 1}))
    opt = build_mot_optimizers([dense], modality_optimizer_config(), None)
    (group,) = opt.optimizers[0].param_groups
    assert len(group["params"]) == len(list(dense.parameters()))


def _init_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], MoTTransformer]:
    """Seeded initial MoT weights (debugmodel, debug_mot.toml vocab) saved with DCP."""
    args = mot_target(CONFIG, "debugmodel")[0]
    torch.manual_seed(0)
    model = MoTTransformer(args)
    with torch.no_grad():
        model.init_weights()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return state, model


def _check_frozen_after_training(tmp_path: Path, nproc: int, frozen: str, extra: list[str]) -> None:
    """4 steps with `frozen` (text, modality 0, or image, 1) frozen: its copies are bitwise the
    initial weights, the other modality's and the shared weights moved."""
    init, model = _init_checkpoint(tmp_path / "init")
    dump = tmp_path / "run"
    run_trainer(small_args(
        dump, 4, "--checkpoint.enable", "--checkpoint.interval", "1000",
        "--checkpoint.initial_load_path", str(tmp_path / "init"),
        "--mot.frozen_modalities", frozen, "--mot.lr_multipliers", "1.0", "0.5", *extra), nproc)
    final = {k: torch.empty_like(v) for k, v in init.items()}
    dcp.load(final, checkpoint_id=str(dump / "checkpoint" / "step-4"), no_dist=True)
    frozen_id = ["text", "image"].index(frozen)
    for name, m in _modality_of(model).items():
        if m == frozen_id:
            assert torch.equal(final[name], init[name]), f"frozen {name} changed"
        elif name.endswith((f"wq.{1 - frozen_id}.weight", f"w2.{1 - frozen_id}.weight")) or m is None:
            assert not torch.equal(final[name], init[name]), f"trainable {name} did not change"


@pytest.mark.slow
def test_frozen_text_unchanged_single_process(tmp_path: Path) -> None:
    _check_frozen_after_training(tmp_path, 1, "text", [])


@pytest.mark.slow
def test_frozen_image_unchanged_fsdp2(tmp_path: Path) -> None:
    _check_frozen_after_training(tmp_path, 2, "image", ["--parallelism.data_parallel_shard_degree", "2"])
