"""The one renderer of the library's :class:`setsens.progress.Progress` events (the library reports, this draws).

On a terminal: one tqdm bar per stage (the ``info`` numbers as its postfix).  When stderr is not a
terminal (a redirected log): one line when a stage first reports, one when its count reaches its
total, and at most one every ``interval`` seconds in between — never a carriage return.  The global
``setsens --quiet`` (or ``enabled=False``) draws nothing.  Every subcommand renders through this class;
no library module imports tqdm.
"""

from __future__ import annotations

import sys
import time

import click

from ..progress import Progress

#: Seconds between two lines of a redirected log (stage starts and ends aside).
INTERVAL = 30.0


def quiet() -> bool:
    """Was ``setsens --quiet`` given (False outside a command line run)?"""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get("setsens.quiet"))


class Bars:
    """``bars(event)`` draws ``event``; ``labels`` name the stages (default: the stage's name); ``units`` their
    units.  A context manager: leaving it closes the bars."""

    def __init__(self, labels: dict[str, str] | None = None, *, enabled: bool = True,
                 units: dict[str, str] | None = None, stream=None, tty: bool | None = None,
                 interval: float = INTERVAL, clock=time.monotonic):
        self.labels, self.units = labels or {}, units or {}
        self.enabled = enabled and not quiet()
        self.stream = sys.stderr if stream is None else stream
        self.tty = _isatty(self.stream) if tty is None else tty
        self.interval, self.clock = interval, clock
        self._bars: dict = {}
        self._seen: dict[str, float] = {}  # stage → when it first reported (lines only)
        self._last_line = clock()

    def __call__(self, event: Progress) -> None:
        if not self.enabled:
            return
        if self.tty:
            self._draw(event)
        else:
            self._line(event)

    def label(self, stage: str) -> str:
        return self.labels.get(stage, stage)

    def _draw(self, e: Progress) -> None:
        from tqdm import tqdm

        bar = self._bars.get(e.stage)
        if bar is None:
            bar = self._bars[e.stage] = tqdm(total=e.total, desc=self.label(e.stage), leave=False, file=self.stream,
                                             unit=self.units.get(e.stage, "it"), dynamic_ncols=True)
        if e.done < bar.n or e.total != bar.total:  # a new run of the stage
            bar.reset(total=e.total)
        numbers = _numbers(e.info)
        if numbers:
            bar.set_postfix(numbers, refresh=False)
        bar.update(e.done - bar.n)
        if e.total is not None and e.done >= e.total:  # the stage's run is over (as a tqdm loop ends)
            bar.close()
            del self._bars[e.stage]

    def _line(self, e: Progress) -> None:
        now = self.clock()
        first = e.stage not in self._seen
        if first:
            self._seen[e.stage] = now
        if first or (e.total is not None and e.done == e.total) or now - self._last_line >= self.interval:
            count = f"{e.done}/{e.total}" if e.total is not None else f"{e.done}"
            numbers = ", ".join(f"{k} {v}" for k, v in _numbers(e.info).items())
            print(f"[{self.label(e.stage)}] {count} ({now - self._seen[e.stage]:.0f} s)"
                  + (f": {numbers}" if numbers else ""), file=self.stream, flush=True)
            self._last_line = now

    def close(self) -> None:
        """Close the open bars (a later event opens new ones, and a redirected log times it afresh)."""
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        self._seen.clear()

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _numbers(info) -> dict[str, str]:
    return {k: f"{v:.3g}" if isinstance(v, float) else str(v) for k, v in info.items()
            if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
