"""The model's input types: modality ids kept in host memory up to the model.

The model counts the tokens per modality on the host, so its forward never copies anything
back from the device; the one copy to the device goes through pinned memory
(`copy_without_waiting`). The trainer wraps each batch's ids in `HostTensor`
(`keep_modality_ids_on_host`); how they travel through pipeline and context parallel is
`infra/modality_ids.py`.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

MODALITY_IDS = "modality_ids"


@dataclass(frozen=True)
class HostTensor:
    """Modality ids that must stay in host memory until `build_routing` has counted them.

    TorchTitan's `train_step`, FSDP2's and DDP's root pre-forward all move every
    `torch.Tensor` argument to the device (a blocking copy); this wrapper is not a tensor, so
    they pass it through. It is a pytree node, so pipeline parallel still splits the ids
    into microbatches along with the tokens.
    """

    tensor: torch.Tensor


pytree.register_dataclass(HostTensor)


def copy_without_waiting(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t.to(device)` that never waits for the device. A blocking host->GPU copy synchronises
    the stream, and from pageable memory even a non-blocking one may, so host tensors go
    through page-locked memory (PyTorch keeps that buffer until the copy has run)."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def keep_modality_ids_on_host(
    batches: Iterable[tuple[dict[str, Any], torch.Tensor]],
) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """Wrap each batch's `modality_ids` in `HostTensor`, which TorchTitan's `train_step`
    does not move to the device; the model unwraps them."""
    for input_dict, labels in batches:
        if isinstance(input_dict.get(MODALITY_IDS), torch.Tensor):
            input_dict = {**input_dict, MODALITY_IDS: HostTensor(input_dict[MODALITY_IDS])}
        yield input_dict, labels
