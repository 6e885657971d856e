"""Modality ids stay in host memory from the dataloader into the model's forward.

Three things move batch tensors to the device before MoT's forward could count the ids on
the host: TorchTitan's `train_step`, and FSDP2's / DDP's root pre-forward. `HostTensor`
must pass all three untouched and still be split into pipeline microbatches.
"""

import torch
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks
from torch.distributed.utils import _to_kwargs
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims

from torchtitan_mot.infra.modality_ids import prepare_mot_inputs
from torchtitan_mot.model.inputs import HostTensor, keep_modality_ids_on_host

META = torch.device("meta")  # stands for the accelerator: a tensor moved there has no data


def _batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    tokens = torch.randint(0, 100, (4, 8))
    return {"input": tokens, "modality_ids": torch.randint(0, 2, (4, 8))}, tokens.roll(-1, 1)


def test_trainer_batches_keep_the_ids_on_the_host() -> None:
    batch, labels = _batch()
    ((input_dict, labels),) = list(keep_modality_ids_on_host(iter([(batch, labels)])))
    assert isinstance(input_dict["modality_ids"], HostTensor)
    # TorchTitan's train_step moves every tensor of the batch to the device.
    moved = {k: v.to(META) if isinstance(v, torch.Tensor) else v for k, v in input_dict.items()}
    parallel_dims = ParallelDims(
        dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1
    )
    inputs, _, extra_inputs, extra_kwargs = prepare_mot_inputs(
        moved["input"], labels.to(META), {"modality_ids": moved["modality_ids"]}, {},
        parallel_dims, JobConfig(), META,
    )
    assert inputs.device == META
    assert extra_inputs == {}
    assert extra_kwargs["modality_ids"].tensor is batch["modality_ids"]  # still on the host


def test_fsdp_and_ddp_input_moves_skip_host_ids() -> None:
    """`_to_kwargs` is what FSDP2's and DDP's root pre-forward call on the model's inputs."""
    batch, _ = _batch()
    (args,), (kwargs,) = _to_kwargs(
        (batch["input"],), {"modality_ids": HostTensor(batch["modality_ids"])}, META, False
    )
    assert args[0].device == META
    assert kwargs["modality_ids"].tensor is batch["modality_ids"]


def test_pipeline_microbatches_split_host_ids_with_the_tokens() -> None:
    batch, _ = _batch()
    args, kwargs = split_args_kwargs_into_chunks(
        (batch["input"],), {"modality_ids": HostTensor(batch["modality_ids"])}, chunks=2
    )
    for i, (a, k) in enumerate(zip(args, kwargs)):
        assert isinstance(k["modality_ids"], HostTensor)
        assert torch.equal(k["modality_ids"].tensor, batch["modality_ids"][2 * i : 2 * i + 2])
        assert a[0].shape == k["modality_ids"].tensor.shape


def test_batches_without_modality_ids_pass_through() -> None:
    batch = ({"input": torch.zeros(1, 4, dtype=torch.long)}, torch.zeros(1, 4))
    ((input_dict, _),) = list(keep_modality_ids_on_host(iter([batch])))
    assert input_dict.keys() == {"input"}
