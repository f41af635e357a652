"""One shape for the progress of every long call: ``progress(Progress(stage, done, total, info))``.

Every long library call takes ``progress: Callable[[Progress], None] | None`` and calls it after each
unit of work (a training step, a scored candidate, a grid point, a retraining).  The library only
reports; rendering — tqdm bars on a terminal, a line per stage in a log, nothing with ``--quiet`` —
is the command line's (:mod:`setsens.experiments.bars`).  A Krylov ``callback(k, residual, x)`` is
not progress: it is a solver hook that can stop the solve.

This module is below every other one (it imports nothing of setsens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Progress:
    """``done`` units of ``stage`` out of ``total`` (None: not known in advance); ``info``: what the unit
    found (a candidate's scores, a ratio), for display."""

    stage: str
    done: int = 0
    total: int | None = None
    info: Mapping[str, Any] = field(default_factory=dict)


ProgressFn = Callable[[Progress], None]


def report(progress: ProgressFn | None, stage: str, done: int = 0, total: int | None = None, **info) -> None:
    """Call ``progress`` (if any) with ``Progress(stage, done, total, info)``."""
    if progress is not None:
        progress(Progress(stage, done, total, info))


def counted(progress: ProgressFn | None, items: Iterable, stage: str, total: int | None = None) -> Iterator:
    """``items``, reporting ``stage`` after each one (``total`` defaults to ``len(items)`` where it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    for done, item in enumerate(items, 1):
        yield item
        report(progress, stage, done, total)


def part(progress: ProgressFn | None, stage: str, start: int, total: int | None) -> ProgressFn | None:
    """``progress`` for a call that is one part of a longer count: its events become ``stage``, their ``done``
    shifted by ``start`` and their total ``total`` (e.g. the second of two fine-tuning runs of T steps:
    ``part(progress, "retrain", T, 2 * T)``)."""
    if progress is None:
        return None
    return lambda e: progress(Progress(stage, start + e.done, total, e.info))
