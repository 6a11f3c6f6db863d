"""Memory-pressure sources for the scheduler (docs/scheduler.md).

A source is anything with ``sample() -> (used_bytes, total_bytes)``: pass
one as ``SchedulerConfig(pressure_source=...)``. The scheduler calls it from
its own task, holding the GIL only for the call; an exception or a bad value
makes that check a skip, never a crash. Built-in sources are named by
string: ``"system"``, ``"nvml"``, ``"noop"``.

>>> from erllama.pressure import sample
>>> used, total = sample("system")
>>> 0 < used <= total
True
>>> sample("noop")
(0, 1)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from erllama import _erllama

__all__ = ["PressureSource", "details", "sample"]


@runtime_checkable
class PressureSource(Protocol):
    """Anything the scheduler can sample."""

    def sample(self) -> tuple[int, int]:
        """Returns ``(used_bytes, total_bytes)``; a total of 0 means unknown."""
        ...


def sample(source: str) -> tuple[int, int]:
    """Samples a built-in source once.

    Raises :class:`~erllama.errors.NotSupportedError` with the reason when the
    source is unavailable here (``"nvml"`` without an NVIDIA driver or GPU).
    """
    used, total, _ = _erllama.sample_pressure(source)
    return used, total


def details(source: str) -> dict[str, str]:
    """The figures a built-in source reports besides the totals (per GPU, ...)."""
    return dict(_erllama.sample_pressure(source)[2])
