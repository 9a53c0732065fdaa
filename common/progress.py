"""Progress of long runs: a tqdm bar in a terminal, one plain line per step where standard error is not one.

    with line_progress():                                   # the command line, unless --quiet
        qm = polyquant.quantize(model, config, calib)       # progress=None: bars only in a terminal

    bar = progress_bar(total=len(layers), desc="calibrating", bars=run.progress)    # in a handler
    for layer in layers:
        ...
        bar.update(1, step=layer.name)     # terminal: the bar moves; log file: "calibrating: 3/48 blocks.0.fc1 (4.1 s)"
    bar.close()

    for unit in progress_iter(units, desc="Q-HyViT", bars=run.progress): ...

A bar is drawn when ``bars`` is true (``RunOptions.progress``: standard error is a terminal, or the caller asked);
otherwise lines are printed inside ``line_progress()`` (off a terminal a long calibration would print nothing for
minutes and look hung) and nothing at all outside it, so library calls stay silent.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol, TypeVar

__all__ = ["Progress", "line_progress", "lines_enabled", "progress_bar", "progress_iter"]

T = TypeVar("T")

_LINES: ContextVar[bool] = ContextVar("polyquant_line_progress", default=False)


class Progress(Protocol):
    """What ``progress_bar`` returns: ``update`` after each step (``n`` units of work, the step's name)."""

    def update(self, n: float = 1, step: str = "") -> None: ...

    def close(self) -> None: ...


@contextmanager
def line_progress(enabled: bool = True) -> Iterator[None]:
    """Inside, progress that draws no bar prints one line per step on standard error (when ``enabled``)."""
    token = _LINES.set(enabled)
    try:
        yield
    finally:
        _LINES.reset(token)


def lines_enabled() -> bool:
    """Whether progress lines are on here (inside ``line_progress()``)."""
    return _LINES.get()


class _Silent:
    def update(self, n: float = 1, step: str = "") -> None:
        pass

    def close(self) -> None:
        pass


class _Lines:
    """One line per update: ``<desc>: <done>/<total> <step> (<elapsed> s)``, or a percentage for work units."""

    def __init__(self, total: float | None, desc: str, percent: bool) -> None:
        self.total, self.desc, self.percent = total, desc, percent
        self.done = 0.0
        self.start = time.perf_counter()

    def update(self, n: float = 1, step: str = "") -> None:
        self.done += n
        if self.total and self.percent:
            where = f"{100.0 * self.done / self.total:.0f}%"
        else:
            where = f"{self.done:g}" + (f"/{self.total:g}" if self.total else "")
        elapsed = time.perf_counter() - self.start
        print(f"{self.desc}: {where}{' ' + step if step else ''} ({elapsed:.1f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _Bar:
    def __init__(self, total: float | None, desc: str, percent: bool) -> None:
        from tqdm.auto import tqdm

        fmt = "{l_bar}{bar}| [{elapsed}<{remaining}{postfix}]" if percent else None  # work units: no count or rate
        self.bar = tqdm(total=total, desc=desc, bar_format=fmt)

    def update(self, n: float = 1, step: str = "") -> None:
        if step:
            self.bar.set_postfix_str(step, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def progress_bar(*, total: float | None, desc: str, bars: bool, percent: bool = False) -> Progress:
    """A tqdm bar (``bars``), else progress lines inside ``line_progress()``, else nothing. ``percent``: the
    total counts work units (estimated costs), shown as a percentage rather than a count."""
    if bars:
        return _Bar(total, desc, percent)
    if lines_enabled():
        return _Lines(total, desc, percent)
    return _Silent()


def progress_iter(items: Iterable[T], *, desc: str, bars: bool, step: Callable[[T], str] | None = None
                  ) -> Iterator[T]:
    """``items``, with one ``progress_bar`` step after each (``step(item)`` names it; default: none)."""
    total = len(items) if isinstance(items, Sequence) else None
    bar = progress_bar(total=total, desc=desc, bars=bars)
    try:
        for item in items:
            yield item
            bar.update(1, step=step(item) if step is not None else "")
    finally:
        bar.close()
