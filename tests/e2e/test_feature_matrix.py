"""TorchTitan's feature matrix with MoT: CI runs a representative subset end to end.

The full matrix (51 sets, about 40 minutes on 2 cores) is `python scripts/feature_matrix.py`.
"""

from pathlib import Path

import pytest

from torchtitan_mot.testing.feature_matrix import CI_SUBSET, FEATURE_SETS, FeatureMatrix

REPO = Path(__file__).resolve().parents[2]
BY_NAME = {fs.name: fs for fs in FEATURE_SETS}


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
@pytest.mark.parametrize("name", CI_SUBSET)
def test_feature_set(name: str, matrix: FeatureMatrix) -> None:
    outcome = matrix.run(BY_NAME[name])
    assert outcome.status == "passed", outcome.detail
