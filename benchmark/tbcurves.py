"""Read scalar curves out of TensorBoard run directories with tensorboard's own event reader."""

from dataclasses import dataclass

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@dataclass
class Curve:
    steps: np.ndarray
    values: np.ndarray
    seconds: np.ndarray  # wall time of each point since the run's first event
    start_time: float


def load_curve(run_dir: str, tag: str = "charts/episodic_return") -> Curve | None:
    """The tag's points in step order, or None if the run never logged it. Every point is kept (no sampling)."""
    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    if tag not in accumulator.Tags()["scalars"]:
        return None
    events = sorted(accumulator.Scalars(tag), key=lambda e: (e.step, e.wall_time))
    start = accumulator.FirstEventTimestamp()
    return Curve(
        steps=np.array([e.step for e in events], dtype=np.int64),
        values=np.array([e.value for e in events], dtype=np.float64),
        seconds=np.array([e.wall_time - start for e in events]),
        start_time=start,
    )


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` points at each point (fewer at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    index = np.arange(1, len(values) + 1)
    lower = np.maximum(index - window, 0)
    return (sums[index] - sums[lower]) / (index - lower)


def first_crossing(curve: Curve, threshold: float, window: int) -> tuple[int, float] | None:
    """(step, seconds) where the trailing mean over `window` points first reaches threshold, counting only points
    with a full window; None if it never does."""
    means = trailing_mean(curve.values, window)
    hits = np.flatnonzero((means >= threshold) & (np.arange(len(means)) >= window - 1))
    if not len(hits):
        return None
    return int(curve.steps[hits[0]]), float(curve.seconds[hits[0]])
