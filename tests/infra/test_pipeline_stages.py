"""Where pipeline parallel puts a Transfusion model's diffusion layers (`infra/pipeline.py`)."""

import pytest
from torchtitan.distributed.pipeline_parallel import generate_llm_fqn_per_model_part

from torchtitan_mot.infra.pipeline import check_diffusion_layers, with_diffusion_layers


@pytest.mark.parametrize("stages, layers", [(2, 6), (4, 8), (1, 2)])
def test_each_diffusion_layer_lives_on_exactly_the_stage_that_runs_it(stages: int, layers: int) -> None:
    names = with_diffusion_layers(generate_llm_fqn_per_model_part(stages, layers))
    assert [n for n in names[0] if n.startswith("diffusion.")][:2] == ["diffusion.patch_in", "diffusion.time_embed"]
    assert "diffusion.patch_out" in names[-1]
    every = [n for stage in names for n in stage if n.startswith("diffusion.")]
    assert sorted(every) == ["diffusion.patch_in", "diffusion.patch_out", "diffusion.time_embed"]
    check_diffusion_layers(names)  # what it adds is what a user's list must say


def test_a_user_stage_list_without_the_diffusion_layers_is_refused() -> None:
    names = generate_llm_fqn_per_model_part(2, 6)
    with pytest.raises(ValueError, match="module_fqns_per_model_part"):
        check_diffusion_layers(names)
    moved = with_diffusion_layers(names)
    moved[0].remove("diffusion.time_embed")
    moved[1].append("diffusion.time_embed")
    with pytest.raises(ValueError, match="'tok_embeddings'"):
        check_diffusion_layers(moved)
