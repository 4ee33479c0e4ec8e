"""Shared timing for the speed benches (``clip_speed.py``, ``sam_speed.py``, ``onnx_speed.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, object]]:
    """Median seconds per call of each function and its output, the functions called in turn
    ``rounds`` times after one warm-up call each: a slower or faster spell of the machine
    (shared cores) then falls on every path alike, and the ratios stay fair."""
    outs = {name: fn() for name, fn in fns.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), outs[name]) for name in fns}
