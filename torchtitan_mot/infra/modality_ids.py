"""Modality ids (and a Transfusion batch's image inputs) through pipeline parallel
(microbatching) and context parallel (sharding).

The ids are the model's input (`model/inputs.py`: `HostTensor`, kept in host memory up to
the model). TorchTitan 0.2.2 splits a batch into `extra_inputs` (first pipeline stage only) and
`extra_kwargs` (every stage), and context parallel shards only `inputs`, `labels` and
`positions`. Every MoT block needs the modality of every token, so `modality_ids` must
reach every stage and, under context parallel, be sharded exactly like the tokens
(including the load balancer's reordering).
"""

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.attention.flex_attention import BlockMask
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.context_parallel import cp_shard

from torchtitan_mot.compat.torchtitan_0_2_2 import shard_on_host_for_context_parallel
from torchtitan_mot.model.inputs import HostTensor, MODALITY_IDS

DIFFUSION_INPUTS = ("patches", "timesteps", "image_ids")
"""A Transfusion batch's model inputs, passed to EVERY pipeline stage: the first embeds the
patches and timesteps, every stage builds the attention mask from the image ids, and the
last returns eps because patches were given. Kwargs are not communicated between stages
(each rank has its own batch), so this costs no transfer."""


def shard_for_context_parallel(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    modality_ids: torch.Tensor | None,
    attention_masks: Any,
    cp_mesh: DeviceMesh,
    device: torch.device,
    load_balancer_type: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, Any]:
    """TorchTitan's `prepare_context_parallel_input`, with modality ids sharded alongside.

    All tensors go through ONE `cp_shard` call, hence one load balancer: this rank's
    tokens, labels, positions and modality ids come from the same sequence positions.
    Returns (inputs, labels, positions, modality_ids, attention_masks).
    """
    if attention_masks is not None and not isinstance(attention_masks, BlockMask):
        # cp_shard's `isinstance(x, (BlockMask, dict[str, BlockMask]))` raises on anything
        # but a BlockMask (0.2.2 bug); MoT's flex path makes a single BlockMask.
        raise ValueError(
            f"context parallel needs a single BlockMask (attn_type='flex') or no mask "
            f"(attn_type='sdpa'); got {type(attention_masks).__name__}"
        )
    positions = torch.arange(inputs.shape[1], dtype=torch.int32, device=device).expand(
        inputs.shape
    )
    buffers = (inputs, labels, positions) + (() if modality_ids is None else (modality_ids,))
    sharded, attention_masks = cp_shard(cp_mesh, buffers, attention_masks, load_balancer_type)
    inputs, labels, positions = sharded[:3]
    modality_ids = sharded[3] if modality_ids is not None else None
    return inputs, labels, positions, modality_ids, attention_masks


def prepare_mot_inputs(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    extra_inputs: dict[str, torch.Tensor],
    extra_kwargs: dict[str, Any],
    parallel_dims: ParallelDims,
    job_config: JobConfig,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """Move `modality_ids` and a Transfusion batch's `DIFFUSION_INPUTS` to `extra_kwargs`
    (every pipeline stage) and apply context parallel.

    Works on UNSHARDED tensors, in place of the base class's `prepare_context_parallel_input`
    step (`split_mot_batch` is the whole `post_dataloading_process`).

    Pipeline microbatching splits `extra_kwargs` along the batch dim, like `inputs`
    (`HostTensor` is a pytree node: its ids are split too). Ids kept on the host stay
    wrapped up to the model; under context parallel they are sharded on the host in the
    tokens' order (on the device only with the "ptrr" balancer of flex attention).
    """
    extra_inputs = dict(extra_inputs)
    extra_kwargs = dict(extra_kwargs)
    for name in (MODALITY_IDS, *DIFFUSION_INPUTS):
        if name in extra_inputs:
            extra_kwargs[name] = extra_inputs.pop(name)
    modality_ids = extra_kwargs.get(MODALITY_IDS)
    on_host = isinstance(modality_ids, HostTensor)
    if on_host:
        modality_ids = modality_ids.tensor
    if modality_ids is not None and modality_ids.shape != inputs.shape:
        raise ValueError(
            f"modality_ids shape {tuple(modality_ids.shape)} != inputs {tuple(inputs.shape)}"
        )
    if parallel_dims.cp_enabled:
        unsharded = sorted(set(extra_inputs) | (set(extra_kwargs) & set(DIFFUSION_INPUTS)))
        if unsharded:
            raise ValueError(
                f"context parallel would leave {unsharded} unsharded; only "
                f"{MODALITY_IDS} is sharded with the tokens"
            )
        cp_mesh = parallel_dims.get_mesh("cp")
        balancer = job_config.parallelism.context_parallel_load_balancer
        host_shard = None
        if on_host and modality_ids is not None:
            host_shard = shard_on_host_for_context_parallel(modality_ids, cp_mesh, balancer)
        inputs, labels, positions, device_shard, masks = shard_for_context_parallel(
            inputs,
            labels,
            None if modality_ids is None or host_shard is not None else modality_ids.to(inputs.device),
            extra_kwargs.get("attention_masks"),
            cp_mesh,
            device,
            balancer,
        )
        extra_kwargs["positions"] = positions
        if host_shard is not None:
            # Sharded on the host in the tokens' order: the forward still reads nothing back.
            extra_kwargs[MODALITY_IDS] = HostTensor(host_shard)
        elif device_shard is not None:
            extra_kwargs[MODALITY_IDS] = device_shard
        if masks is not None:
            extra_kwargs["attention_masks"] = masks
    return inputs, labels, extra_inputs, extra_kwargs


def split_mot_batch(
    input_dict: dict[str, torch.Tensor],
    labels: torch.Tensor,
    model: nn.Module,
    tokenizer: BaseTokenizer | None,
    parallel_dims: ParallelDims,
    job_config: JobConfig,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """`Trainer.post_dataloading_process` for MoT (training and validation alike).

    TorchTitan's split into (inputs, labels, extra_inputs, extra_kwargs) with flex/varlen
    attention masks, then `prepare_mot_inputs`. TorchTitan's own version cannot be reused:
    it would shard the tokens for context parallel without the modality ids.
    """
    inputs = input_dict["input"]
    extra_inputs = {k: v for k, v in input_dict.items() if k != "input"}
    extra_kwargs: dict[str, Any] = {}
    model_args = getattr(model, "model_args", None)
    if getattr(model_args, "attn_type", "sdpa") in ("flex", "varlen"):
        extra_kwargs["attention_masks"] = model.get_attention_masks(
            input_batch=inputs, tokenizer=tokenizer, extra_inputs=extra_inputs
        )
    return prepare_mot_inputs(
        inputs, labels, extra_inputs, extra_kwargs, parallel_dims, job_config, device
    )
