"""Pipeline parallel of an MoT model: TorchTitan's `pipeline_llm`, with a Transfusion
flavor's diffusion layers on the stages that run them.

The patch encoder and timestep embedding replace token embeddings, so they live with
`tok_embeddings` on the first stage; the patch decoder reads the final hidden state, so it
lives with `output` on the last. Each parameter lives on exactly one stage (no copies to keep
in step, one owner per checkpoint key). What the stages are given per microbatch is
`infra/modality_ids.py` (inputs) and `trainer/loss.py` (`pack_target`, the loss target).
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.protocols.model import BaseModelArgs

from torchtitan_mot.compat.torchtitan_0_2_2 import pipeline_stage_modules

FIRST_STAGE_DIFFUSION = ("diffusion.patch_in", "diffusion.time_embed")
LAST_STAGE_DIFFUSION = ("diffusion.patch_out",)


def with_diffusion_layers(stages: list[list[str]]) -> list[list[str]]:
    """Per-stage module names with the diffusion layers added where they run."""
    return [
        [
            *names,
            *(FIRST_STAGE_DIFFUSION if "tok_embeddings" in names else ()),
            *(LAST_STAGE_DIFFUSION if "output" in names else ()),
        ]
        for names in stages
    ]


def check_diffusion_layers(stages: list[list[str]]) -> None:
    """A user's `parallelism.module_fqns_per_model_part` must place the diffusion layers as
    `with_diffusion_layers` does (otherwise a stage would run without them)."""
    others = [[n for n in names if not n.startswith("diffusion.")] for names in stages]
    if [sorted(names) for names in with_diffusion_layers(others)] != [sorted(n) for n in stages]:
        raise ValueError(
            f"--parallelism.module_fqns_per_model_part {stages}: a Transfusion model needs "
            f"{list(FIRST_STAGE_DIFFUSION)} in the stage with 'tok_embeddings' and "
            f"{list(LAST_STAGE_DIFFUSION)} in the stage with 'output', nowhere else"
        )


def pipeline_mot(
    model: nn.Module,
    parallel_dims: ParallelDims,
    job_config: JobConfig,
    device: torch.device,
    model_args: BaseModelArgs,
    parallelize_fn: Callable[..., nn.Module],
    loss_fn: Callable[..., torch.Tensor],
) -> tuple[_PipelineSchedule, list[nn.Module], bool, bool]:
    """`TrainSpec.pipelining_fn` for MoT: `pipeline_llm`, diffusion layers placed by stage."""
    args = (model, parallel_dims, job_config, device, model_args, parallelize_fn, loss_fn)
    if getattr(model, "diffusion", None) is None:
        return pipeline_llm(*args)
    given = job_config.parallelism.module_fqns_per_model_part
    if given is not None:
        check_diffusion_layers(given)
        return pipeline_llm(*args)
    with pipeline_stage_modules(with_diffusion_layers):
        return pipeline_llm(*args)
