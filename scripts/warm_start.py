"""Warm start an MoT model from a dense Llama3 checkpoint: `python -m torchtitan_mot.warm_start`
(see that module for the arguments); kept so existing `python scripts/warm_start.py` calls work."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan_mot.warm_start import main  # noqa: E402

if __name__ == "__main__":
    main()
