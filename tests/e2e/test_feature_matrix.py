"""TorchTitan's feature matrix with MoT (`harness.feature_matrix`): CI runs a representative
subset end to end; with `MOT_FEATURE_MATRIX=all` in the environment every set is a test
(`python scripts/feature_matrix.py` sets it: 51 sets, about 40 minutes on 2 cores).
"""

import os

import pytest
from harness.feature_matrix import (
    CI_SUBSET,
    FEATURE_SETS,
    FeatureMatrix,
    PRECISION_SETS,
    TORCHTITAN_SETS,
)
from harness.trainer import REPO

TORCHTITAN_0_2_2_SETS = (
    "default", "1d_compile", "1d_compile_sac_op", "2d_eager", "2d_compile", "2d_asynctp_compile",
    "full_checkpoint", "model_only_hf_checkpoint", "last_save_model_only_fp32",
    "last_save_model_only_bf16", "pp_looped_zero_bubble", "pp_zbv", "pp_1f1b", "pp_gpipe",
    "pp_dp_1f1b", "pp_dp_gpipe", "pp_tp", "pp_dp_tp", "3d_compile", "pp_looped_1f1b",
    "pp_custom_csv", "optimizer_foreach", "ddp", "hsdp", "fsdp+flex_attn",
    "fsdp+flex_attn+per_op_sac", "fsdp+varlen_attn+per_op_sac", "cp_allgather", "cp_alltoall",
    "hsdp+tp", "fsdp+cp", "hsdp+cp_without_dp_shard", "hsdp+cp_with_dp_shard", "fsdp+tp+cp",
    "cpu_offload+opt_in_bwd+TP+DP+CP", "fsdp2_memory_estimation", "test_generate",
    "fsdp_reshard_always", "optional_checkpoint", "float8_emulation", "gradient_accumulation",
    "validation_tp_cp_pp", "dataloader_kwargs",
)
"""The `test_name`s of TorchTitan v0.2.2's `tests/integration_tests/features.py`
(`build_features_test_list()`), in its order."""
BY_NAME = {fs.name: fs for fs in FEATURE_SETS}
SETS = list(BY_NAME) if os.environ.get("MOT_FEATURE_MATRIX") == "all" else CI_SUBSET


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> FeatureMatrix:
    return FeatureMatrix(REPO, tmp_path_factory.mktemp("feature_matrix"))


def test_matrix_lists_torchtitans_sets() -> None:
    """Every upstream set is listed under its own name, in upstream's order, and the two sets
    upstream disables are the ones marked disabled here."""
    names = [fs.name for fs in TORCHTITAN_SETS]
    assert names == list(TORCHTITAN_0_2_2_SETS)
    assert {fs.name for fs in TORCHTITAN_SETS if fs.disabled} == {"2d_asynctp_compile",
                                                                   "fsdp2_memory_estimation"}
    assert not {fs.name for fs in PRECISION_SETS} & set(TORCHTITAN_0_2_2_SETS)


@pytest.mark.slow
@pytest.mark.parametrize("name", SETS)
def test_feature_set(name: str, matrix: FeatureMatrix) -> None:
    outcome = matrix.run(BY_NAME[name])
    if outcome.status in ("needs CUDA", "disabled"):
        pytest.skip(f"{outcome.status}: {outcome.detail}")
    assert outcome.status == "passed", outcome.detail
