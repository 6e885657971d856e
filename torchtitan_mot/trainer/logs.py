"""What a training run prints: each repeated warning once, and how often it came.

A warning that repeats verbatim (a short validation split re-looped at every validation, a
bad sample skipped again) tells the user nothing new after the first time, yet can bury the
step lines. `concise_logs` installs its filters on TorchTitan's logger for one run and, at the
end, names every repeated warning with its count.
"""

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from torchtitan.tools.logging import logger

from torchtitan_mot.compat.torchtitan_0_2_2 import ModelArgsOnOneLine


class RepeatedWarnings(logging.Filter):
    """Lets the first of identical warnings through and counts the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:  # errors always print
            return True
        message = record.getMessage()
        self.counts[message] += 1
        return self.counts[message] == 1

    def repeated(self) -> dict[str, int]:
        """Each warning that came more than once, with how often it came."""
        return {message: n for message, n in self.counts.items() if n > 1}


@contextmanager
def concise_logs() -> Iterator[None]:
    """For one run: repeated warnings print once, TorchTitan's model-args dump fits one line;
    at the end each repeated warning is printed again with its count."""
    repeats, model_args = RepeatedWarnings(), ModelArgsOnOneLine()
    logger.addFilter(model_args)
    logger.addFilter(repeats)
    try:
        yield
    finally:
        logger.removeFilter(repeats)
        logger.removeFilter(model_args)
        for message, n in repeats.repeated().items():
            logger.warning(f"{message} ({n} times in all; printed once)")
