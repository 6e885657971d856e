"""TorchTitan's integration feature matrix with `--model.name mot`, end to end on CPU/gloo:
a thin runner of tests/e2e/test_feature_matrix.py (one test per feature set).

    python scripts/feature_matrix.py                 # all 51 sets (about 40 min on 2 cores)
    python scripts/feature_matrix.py --ci-subset     # what CI runs
    python scripts/feature_matrix.py --only pp_zbv 2d_compile

pytest prints one line per set (sets that need CUDA or are disabled upstream are skipped with
the reason) and exits non-zero if any set failed. The sets: tests/harness/feature_matrix.py.
"""

import argparse
import os
import sys
from pathlib import Path

import pytest

TEST = Path(__file__).resolve().parents[1] / "tests" / "e2e" / "test_feature_matrix.py"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", help="feature set names")
    p.add_argument("--ci-subset", action="store_true", help="only the sets CI runs")
    a = p.parse_args()
    if not a.ci_subset:
        os.environ["MOT_FEATURE_MATRIX"] = "all"
    ids = [f"{TEST}::test_feature_set[{name}]" for name in a.only] if a.only else [f"{TEST}::test_feature_set"]
    return pytest.main([*ids, "-v", "-rs", "-p", "no:cacheprovider"])


if __name__ == "__main__":
    sys.exit(main())
