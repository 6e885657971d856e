"""The Transfusion loss against a naive reference written here: the cosine schedule's
noising, the epsilon target, the per-image MSE, lambda, and TorchTitan's normalisation over
microbatches (the trainer divides each loss sum by the step's global valid tokens)."""

import math

import torch
from helpers import TINY_TRANSFUSION, transfusion_batch

from torchtitan_mot.model import MoTModelArgs, MoTTransformer
from torchtitan_mot.model.schedule import DiffusionSchedule
from torchtitan_mot.trainer.loss import ModalityLossStats, MoTLoss, noise_batch

T = 1000
LAMBDA = 5.0
BOI = 45


def _naive_alpha_bar(t: int) -> float:
    f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    out = 1.0
    for i in range(t + 1):
        out *= 1 - min(1 - f(i + 1) / f(i), 0.999)
    return out


def _token_modality() -> torch.Tensor:
    table = torch.zeros(TINY_TRANSFUSION["vocab_size"], dtype=torch.long)
    table[BOI:] = 1  # BOI, EOI: the image modality's markers
    return table


def test_noise_batch_is_the_cosine_forward_process() -> None:
    batch, _ = transfusion_batch(2, 16, 6, seed=0)
    extra = {k: batch[k] for k in ("patches", "noise", "timesteps", "image_ids")}
    noised, target = noise_batch(extra, DiffusionSchedule(T))
    assert "noise" not in noised and target.noise is batch["noise"]
    for b, s in zip(*torch.nonzero(batch["image_ids"] >= 0, as_tuple=True)):
        ab = _naive_alpha_bar(int(batch["timesteps"][b, s]))
        ref = math.sqrt(ab) * batch["patches"][b, s] + math.sqrt(1 - ab) * batch["noise"][b, s]
        torch.testing.assert_close(noised["patches"][b, s], ref, atol=1e-5, rtol=1e-5)


def test_loss_equals_naive_reference_over_microbatches() -> None:
    torch.manual_seed(0)
    model = MoTTransformer(MoTModelArgs(**TINY_TRANSFUSION))
    with torch.no_grad():
        model.init_weights()
    schedule = DiffusionSchedule(T)
    stats = ModalityLossStats(["text", "image"])
    loss_fn = MoTLoss(_token_modality(), stats, diffusion_modality=1, diffusion_weight=LAMBDA)
    micro = [transfusion_batch(bs, 16, 6, seed=s) for bs, s in ((2, 1), (1, 2))]
    n_tok = sum(int((labels != -100).sum()) for _, labels in micro)
    n_img = sum(len(set(row.tolist()) - {-1}) for batch, _ in micro for row in batch["image_ids"])

    total = torch.tensor(0.0)
    ce_ref, mse_ref = 0.0, []
    for batch, labels in micro:
        extra = {k: batch[k] for k in ("patches", "noise", "timesteps", "image_ids")}
        noised, target = noise_batch(extra, schedule)
        target.image_weight = n_tok / n_img  # what the trainer sets
        loss_fn.target = target
        with torch.no_grad():
            pred = model(batch["input"], batch["modality_ids"], **noised)
            total = total + loss_fn(pred, labels) / n_tok  # the trainer's division
        logits, eps = pred
        for b in range(labels.shape[0]):
            for s in range(labels.shape[1]):
                if labels[b, s] != -100:
                    ce_ref += -torch.log_softmax(logits[b, s], -1)[labels[b, s]].item()
            for i in sorted(set(batch["image_ids"][b].tolist()) - {-1}):
                at = batch["image_ids"][b] == i
                mse_ref.append(((eps[b, at] - batch["noise"][b, at]) ** 2).mean().item())
    assert len(mse_ref) == n_img
    expected = ce_ref / n_tok + LAMBDA * sum(mse_ref) / n_img
    assert abs(total.item() - expected) < 1e-4 * expected, (total.item(), expected)

    sums, counts = stats.pop()
    means = stats.means(sums, counts)
    assert abs(means["text"] - ce_ref / n_tok) < 1e-5  # BOI targets count as LM loss
    assert abs(means["image"] - sum(mse_ref) / n_img) < 1e-5
    assert counts[1] == n_img


def _naive_total(model, micro, n_tok: int, n_img: int) -> torch.Tensor:
    """CE per valid token + lambda * mean per-image MSE over all microbatches, by loops, with
    x_t from the schedule formula written here."""
    ce, mse = 0.0, 0.0
    for batch, labels in micro:
        ab = torch.tensor([_naive_alpha_bar(int(t)) for t in batch["timesteps"].flatten()])
        ab = ab.view(batch["timesteps"].shape).unsqueeze(-1).float()
        latent = (batch["image_ids"] >= 0).unsqueeze(-1)
        x_t = torch.where(latent, ab.sqrt() * batch["patches"] + (1 - ab).sqrt() * batch["noise"], 0.0)
        logits, eps = model(batch["input"], batch["modality_ids"], patches=x_t,
                            timesteps=batch["timesteps"], image_ids=batch["image_ids"])
        valid = labels != -100
        ce = ce - torch.log_softmax(logits[valid], -1).gather(1, labels[valid][:, None]).sum()
        for b in range(labels.shape[0]):
            for i in sorted(set(batch["image_ids"][b].tolist()) - {-1}):
                at = batch["image_ids"][b] == i
                mse = mse + ((eps[b, at] - batch["noise"][b, at]) ** 2).mean()
    return ce / n_tok + LAMBDA * mse / n_img


def test_trainer_step_noises_counts_images_and_normalises() -> None:
    """MoTTrainer's Transfusion wiring (image count before the step, noising, the loss
    weight) over two microbatches: the summed step loss and the gradients equal the naive
    objective's."""
    import contextlib
    import copy
    from types import SimpleNamespace

    from torchtitan.distributed import ParallelDims

    from torchtitan_mot.trainer.trainer import MoTTrainer

    torch.manual_seed(0)
    model = MoTTransformer(MoTModelArgs(**TINY_TRANSFUSION))
    with torch.no_grad():
        model.init_weights()
    reference = copy.deepcopy(model)
    stats = ModalityLossStats(["text", "image"])
    trainer = MoTTrainer.__new__(MoTTrainer)
    trainer.__dict__.update(
        model_parts=[model], device=torch.device("cpu"), tokenizer=None, job_config=None,
        parallel_dims=ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1,
                                   world_size=1),
        train_context=contextlib.nullcontext, maybe_enable_amp=contextlib.nullcontext(),
        loss_stats=stats, pp_loss_fn=None, gradient_accumulation_steps=2,
        loss_fn=MoTLoss(_token_modality(), stats, diffusion_modality=1, diffusion_weight=LAMBDA),
        nonfinite_guard=SimpleNamespace(record=lambda loss: None),
        diffusion_schedule=DiffusionSchedule(T), _image_weight=1.0, _global_images=None,
    )
    micro = [transfusion_batch(bs, 16, 6, seed=s) for bs, s in ((2, 3), (1, 4))]
    n_tok = sum(int((labels != -100).sum()) for _, labels in micro)
    n_img = sum(len(set(row.tolist()) - {-1}) for batch, _ in micro for row in batch["image_ids"])

    replay = trainer._count_images(iter(micro))
    assert float(trainer._global_images) == n_img
    total = 0.0
    for batch, labels in replay:
        total += trainer.forward_backward_step(
            input_dict=dict(batch), labels=labels, global_valid_tokens=torch.tensor(float(n_tok))
        ).item()
    expected = _naive_total(reference, micro, n_tok, n_img)
    expected.backward()
    assert abs(total - expected.item()) < 1e-4 * expected.item()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_target_splits_with_the_pipeline_microbatches() -> None:
    """Under pipeline parallel the loss target travels packed with the labels
    (`pack_target`): split by the schedule's own functions into microbatches, the loss
    calls sum to the naive objective of the whole batch (weight N_tok / N_img included)."""
    from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks
    from torch.distributed.pipelining.schedules import _split_tensor, _TARGET_CHUNK_SPEC

    from torchtitan_mot.trainer.loss import pack_target

    torch.manual_seed(0)
    model = MoTTransformer(MoTModelArgs(**TINY_TRANSFUSION))
    with torch.no_grad():
        model.init_weights()
    stats = ModalityLossStats(["text", "image"])
    loss_fn = MoTLoss(_token_modality(), stats, diffusion_modality=1, diffusion_weight=LAMBDA)
    batch, labels = transfusion_batch(4, 16, 6, seed=5)
    n_tok = int((labels != -100).sum())
    n_img = sum(len(set(row.tolist()) - {-1}) for row in batch["image_ids"])
    extra = {k: batch[k] for k in ("patches", "noise", "timesteps", "image_ids")}
    noised, target = noise_batch(extra, DiffusionSchedule(T))
    target.image_weight = torch.tensor(n_tok / n_img)
    packed = pack_target(labels, target)

    _, kwarg_mbs = split_args_kwargs_into_chunks(
        (), {"tokens": batch["input"], "modality_ids": batch["modality_ids"], **noised}, 2
    )
    target_mbs = list(_split_tensor(packed, _TARGET_CHUNK_SPEC, 2))
    with torch.no_grad():
        total = sum(loss_fn(model(**kw), t) for kw, t in zip(kwarg_mbs, target_mbs)) / n_tok
        expected = _naive_total(model, [(batch, labels)], n_tok, n_img)
    assert len(target_mbs) == 2
    assert abs(total.item() - expected.item()) < 1e-5 * expected.item(), (total, expected)
