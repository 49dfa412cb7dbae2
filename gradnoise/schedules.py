"""Schedules of the training monitor: when a metric is due (every k steps, a callable, or a
log-spaced set of steps)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Schedule", "check_schedule", "describe", "is_due", "log_spaced"]


Schedule = int | Callable[[int], bool] | None


def log_spaced(base: float = 1.25, start: int = 0) -> Callable[[int], bool]:
    """A schedule due at steps ``start``, and ``⌊base^i⌋`` (deduplicated): dense early,
    sparse late, as for quantities that change fastest at the start of training."""
    if base <= 1:
        raise ValueError(f"base must be > 1, got {base}")
    due: set[int] = {start}
    x = 1.0
    while x < 1e9:
        due.add(int(x))
        x *= base

    def schedule(step: int) -> bool:
        return step in due

    schedule.description = f"log-spaced: step {start} and ⌊{base:g}^i⌋"
    return schedule


def describe(schedule: Schedule) -> int | str | None:
    """A readable description for a run's config: the integer itself, ``None``, or the
    callable's ``description`` (else its name)."""
    if schedule is None or isinstance(schedule, int):
        return schedule
    return getattr(schedule, "description", None) or getattr(schedule, "__name__", type(schedule).__name__)


def check_schedule(schedule: Schedule, name: str) -> None:
    if schedule is None or callable(schedule):
        return
    if isinstance(schedule, bool) or not isinstance(schedule, int) or schedule < 1:
        raise ValueError(f"{name}: an integer schedule means every k ≥ 1 steps, got {schedule!r} (or pass a callable step → bool, or None)")


def is_due(schedule: Schedule, step: int) -> bool:
    if schedule is None:
        return False
    if isinstance(schedule, int):
        return step % schedule == 0
    return bool(schedule(step))
