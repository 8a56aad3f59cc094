"""Wall-clock comparison of a few ways to do the same work, for benchmarks and
the chapters' measurements.

`best_of` calls the candidates in turn, round after round, and keeps each one's
fastest call. Alternating gives every candidate the same share of whatever else
the machine is doing; the minimum is the call that was least disturbed, which on a
shared CPU is far more stable than the mean. Nothing here asserts a time: figures are
printed, and tests check only the behaviour (order of calls, the minimum kept).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Iterable, Mapping

import torch


def best_of(calls: Mapping[str, Callable[[], object]], reps: int = 10,
            warmup: int = 1, clock: Callable[[], float] = time.perf_counter,
            setup: Callable[[str], object] | None = None) -> dict[str, float]:
    """Fastest time in seconds of each call in `calls` over `reps` alternating rounds.

    Each round calls every candidate once, in the mapping's order. `warmup` untimed
    rounds run first (first calls pay for allocation and caches). `clock` is
    the timer (seconds; injectable for tests; time.process_time counts CPU time,
    which does not grow when other programs share the cores). `setup(name)`, if
    given, runs untimed before each call. Returns {name: fastest seconds}, in the
    mapping's order.
    """
    for name, value in (("reps", reps), ("warmup", warmup)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if reps < 1:
        raise ValueError(f"reps ({reps}) must be >= 1")
    if warmup < 0:
        raise ValueError(f"warmup ({warmup}) must be >= 0")
    if not calls:
        raise ValueError("calls is empty: give at least one name -> callable")
    best = {name: float("inf") for name in calls}
    for round_ in range(warmup + reps):
        for name, fn in calls.items():
            if setup is not None:
                setup(name)
            start = clock()
            fn()
            if round_ >= warmup:
                best[name] = min(best[name], clock() - start)
    return best


def spread(values: Iterable[float], fmt: str = ".2f") -> str:
    """'median [min, max]' of `values` (one per run): how the book states a speed
    figure."""
    values = list(values)
    if not values:
        raise ValueError("values is empty: give at least one measurement")
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def machine() -> str:
    """The machine a figure was measured on: CPU model, cores and torch threads;
    the GPU when there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name()}"
    return f"{text}; torch {torch.__version__}"


__all__ = ["best_of", "machine", "spread"]
