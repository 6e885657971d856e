"""What a training run logged, read back from its TensorBoard events.

The trainer writes every logged metric (loss, grad norm, `loss/<modality>`, validation
losses) to `<dump_folder>/<save_tb_folder>/<date>/events.out.tfevents.*` as exact float32
values; the console prints them rounded and coloured. Programs that compare runs
(`python -m torchtitan_mot.compare_dense`, the tests) read the events.
"""

import os
from collections.abc import Iterable
from pathlib import Path

LOSS = "loss_metrics/global_avg_loss"
GRAD_NORM = "grad_norm"


def event_files(dump: str | Path) -> list[Path]:
    """Every TensorBoard event file under a dump folder, oldest first (one per run)."""
    return sorted(Path(dump).rglob("events.out.tfevents.*"), key=os.path.getmtime)


def read_scalars(source: str | Path | Iterable[Path], tag: str = LOSS) -> dict[int, float]:
    """step -> value of `tag` from a dump folder's event files (or the given ones, in order);
    a resumed run's later files win where steps repeat. Empty if no run logged the tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = event_files(source) if isinstance(source, (str, Path)) else source
    values: dict[int, float] = {}
    for events in files:
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def read_steps(source: str | Path | Iterable[Path]) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad norm), from the same sources as `read_scalars`."""
    files = event_files(source) if isinstance(source, (str, Path)) else list(source)
    loss, grad_norm = read_scalars(files, LOSS), read_scalars(files, GRAD_NORM)
    return {step: (value, grad_norm[step]) for step, value in sorted(loss.items())}
