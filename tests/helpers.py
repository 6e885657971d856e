"""Helpers shared by the end-to-end tests (importable as `helpers`: pytest's `pythonpath`)."""

import os
from pathlib import Path


def tb_scalars(dump: Path, tag: str = "loss_metrics/global_avg_loss") -> dict[int, float]:
    """step -> value of `tag` from every TensorBoard event file under `dump` (later files win).

    TensorBoard holds the logged float32 value exactly; the console prints 5 decimals.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(dump.rglob("events.out.tfevents.*"), key=os.path.getmtime):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values
