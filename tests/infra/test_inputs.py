"""Modality ids stay in host memory from the dataloader to the model."""

import torch
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims

from torchtitan_mot.infra.inputs import HostTensor, keep_modality_ids_on_host, prepare_mot_inputs


def test_modality_ids_skip_the_device_move_and_reach_the_model_on_the_host() -> None:
    tokens = torch.randint(0, 100, (2, 8))
    ids = torch.randint(0, 2, (2, 8))
    labels = torch.roll(tokens, -1, 1)
    ((input_dict, labels),) = list(
        keep_modality_ids_on_host(iter([({"input": tokens, "modality_ids": ids}, labels)]))
    )
    assert isinstance(input_dict["modality_ids"], HostTensor)
    # TorchTitan's train_step moves every tensor of the batch; "meta" stands for the device.
    moved = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in input_dict.items()}
    parallel_dims = ParallelDims(
        dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1
    )
    inputs, _, extra_inputs, extra_kwargs = prepare_mot_inputs(
        moved["input"], labels.to("meta"), {"modality_ids": moved["modality_ids"]}, {},
        parallel_dims, JobConfig(), torch.device("meta"),
    )
    assert inputs.device.type == "meta"
    assert extra_inputs == {}
    assert extra_kwargs["modality_ids"] is ids  # unwrapped, still in host memory


def test_batches_without_modality_ids_pass_through() -> None:
    batch = ({"input": torch.zeros(1, 4, dtype=torch.long)}, torch.zeros(1, 4))
    ((input_dict, _),) = list(keep_modality_ids_on_host(iter([batch])))
    assert input_dict.keys() == {"input"}
