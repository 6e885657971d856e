"""TorchTitan's feature matrix with MoT (`harness.feature_matrix`): CI runs a representative
subset end to end; with `MOT_FEATURE_MATRIX=all` in the environment every set is a test
(`python scripts/feature_matrix.py` sets it: 51 sets, about 40 minutes on 2 cores).
"""

import os

import pytest
from harness.feature_matrix import CI_SUBSET, FEATURE_SETS, FeatureMatrix
from harness.trainer import REPO

BY_NAME = {fs.name: fs for fs in FEATURE_SETS}
SETS = list(BY_NAME) if os.environ.get("MOT_FEATURE_MATRIX") == "all" else CI_SUBSET


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> FeatureMatrix:
    return FeatureMatrix(REPO, tmp_path_factory.mktemp("feature_matrix"))


def test_matrix_lists_torchtitans_sets() -> None:
    """All 43 upstream sets are listed, each either run, refused by name, or marked."""
    upstream = [fs for fs in FEATURE_SETS if not fs.name.startswith(("precision_", "cpu_offload"))
                or fs.name == "cpu_offload+opt_in_bwd+TP+DP+CP"]
    assert len(upstream) == 43
    assert sum(bool(fs.needs_cuda) for fs in upstream) == 10
    assert sum(bool(fs.disabled) for fs in upstream) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", SETS)
def test_feature_set(name: str, matrix: FeatureMatrix) -> None:
    outcome = matrix.run(BY_NAME[name])
    if outcome.status in ("needs CUDA", "disabled"):
        pytest.skip(f"{outcome.status}: {outcome.detail}")
    assert outcome.status == "passed", outcome.detail
