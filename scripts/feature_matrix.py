"""TorchTitan's integration feature matrix with `--model.name mot`, end to end on CPU/gloo.

    python scripts/feature_matrix.py                 # all 51 sets (about 40 min on 2 cores)
    python scripts/feature_matrix.py --ci-subset     # what CI runs
    python scripts/feature_matrix.py --only pp_zbv 2d_compile

Prints one line per set and `feature matrix: N passed, M failed, K need CUDA, D disabled
upstream`; exits 1 if any set failed. See torchtitan_mot/testing/feature_matrix.py.
"""

import sys

from torchtitan_mot.testing.feature_matrix import main

if __name__ == "__main__":
    sys.exit(main())
