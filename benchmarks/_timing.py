"""Shared benchmark helpers: interleaved medians against a floor, and peak memory.

Timing: each repetition runs the floor (plain forward + backward of the same model and
batch) and then the measured call, so drifts in clock speed affect both alike; the ratio is
median(call) / median(floor), or the median of the per-pair ratios (:func:`pair_ratio`). Memory: the peak resident set size during one call above the
resident size before it (Linux ``/proc/self/clear_refs`` resets the peak), or on CUDA the
allocator's peak above the allocated memory before the call. Memory is measured in a
separate process (:func:`track_rss`: on glibc, blocks above 64 KiB are mmap-ed and the heap
is trimmed before each measurement, so that the resident size follows live memory instead
of the allocator's pools), because those allocator settings would distort the timings.
"""

from __future__ import annotations

import ctypes
import re
import statistics
import time
from collections.abc import Callable

import torch

_LIBC = None


def track_rss() -> None:
    """glibc: large blocks via mmap, returned on free, so RSS follows live memory.

    This slows allocation-heavy code several-fold: call it only in a process that measures
    memory, never in one that measures time.
    """
    global _LIBC
    try:
        _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        _LIBC.mallopt(-1, 0)  # M_TRIM_THRESHOLD
    except OSError:  # not glibc: peaks may under-count memory reused from the allocator's pools
        _LIBC = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved_medians(
    floor: Callable[[], object], call: Callable[[], object], device: torch.device,
    *, budget_s: float = 2.0, min_reps: int = 5, max_reps: int = 60, warmup: int = 2,
) -> tuple[float, float, int]:  # fmt: skip
    """Median seconds of ``floor`` and ``call``, alternated, within about ``budget_s``."""
    f, c = interleaved_times(floor, call, device, budget_s=budget_s, min_reps=min_reps, max_reps=max_reps,
                             warmup=warmup)  # fmt: skip
    return statistics.median(f), statistics.median(c), len(f)


def interleaved_times(
    floor: Callable[[], object], call: Callable[[], object], device: torch.device,
    *, budget_s: float = 2.0, min_reps: int = 5, max_reps: int = 60, warmup: int = 2,
) -> tuple[list[float], list[float]]:  # fmt: skip
    """Seconds of ``floor`` and ``call`` in pairs, alternated, within about ``budget_s``."""
    for _ in range(warmup):
        floor()
        call()
    first = timed(call, device) + timed(floor, device)
    reps = int(min(max_reps, max(min_reps, budget_s / max(first, 1e-6))))
    f, c = [], []
    for _ in range(reps):
        f.append(timed(floor, device))
        c.append(timed(call, device))
    return f, c


def pair_ratio(f: list[float], c: list[float]) -> float:
    """The median over pairs of ``call / floor``: each pair ran back to back, so a drift in
    the machine's speed during the run cancels in it, where the ratio of the two medians
    would take the floor's and the call's medians from different moments."""
    return statistics.median(ci / fi for fi, ci in zip(f, c, strict=True))


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"{field}:\s+(\d+)", fh.read()).group(1)) * 1024


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Extra peak memory of one call of ``fn`` over the memory in use before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status("VmRSS")
    out = fn()
    del out
    return _status("VmHWM") - before
