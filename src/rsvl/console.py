"""Terminal output shared by the CLI and long-running work.

stdout is reserved for results (and exactly one JSON document under ``--json``); every
notice, warning and progress bar goes to stderr.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: ``advance(n)``: n more units of work are done
Advance = Callable[[int], None]


class TaskProgress(Protocol):
    """The one progress interface every task takes as ``progress``.

    The task calls it once with the total amount of work it is about to do (tiles, images)
    and advances the ``advance(n)`` callable yielded by the returned context manager as work
    completes. The command line passes :func:`task_progress`; tests pass any callable of
    this shape; None (the default of every task) shows nothing.
    """

    def __call__(self, total: int) -> AbstractContextManager[Advance]: ...


@dataclass
class _State:
    debug: bool = False
    quiet: bool = False

    @property
    def err(self) -> Console:
        return Console(stderr=True, highlight=False, soft_wrap=True)

    def notice(self, message: str) -> None:
        if not self.quiet:
            self.err.print(message, markup=False)

    def warn(self, message: str) -> None:
        # Warnings are shown even under --quiet: they change what the output means.
        self.err.print(f"warning: {message}", style="yellow", markup=False)

    def error(self, message: str) -> None:
        self.err.print(f"error: {message}", style="bold red", markup=False)


state = _State()


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout (the --json contract)."""
    sys.stdout.write(json.dumps(document, indent=2, default=_json_default, allow_nan=False))
    sys.stdout.write("\n")
    sys.stdout.flush()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _no_advance(n: int = 1) -> None:
    return None


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressLines:
    """Plain progress lines for logs (stderr not a terminal), e.g.
    ``segment: 120/1200 tiles, 3.1 tiles/s, eta 5m48s``: one each time another tenth of the
    work is done or ``every`` seconds have passed since the last line, and one at the end."""

    def __init__(self, total: int, description: str, *, unit: str = "tiles", every: float = 30.0,
                 write: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.description, self.unit, self.every = total, description, unit, every
        self.write = write if write is not None else self._stderr
        self.clock = clock
        self.done = 0
        self.start = self.last = clock()
        self.tenth = 0  # tenths of the work already reported

    @staticmethod
    def _stderr(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def __call__(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        tenth = 10 * self.done // self.total if self.total > 0 else 10
        if tenth > self.tenth or now - self.last >= self.every or self.done >= self.total:
            if self.done >= self.total and self.tenth >= 10:
                return  # the final line is out already
            self.tenth = max(tenth, self.tenth)
            self.last = now
            self.write(self.line(now))

    def line(self, now: float) -> str:
        text = f"{self.description}: {self.done}/{self.total} {self.unit}"
        elapsed = now - self.start
        if elapsed > 0 and self.done > 0:
            rate = self.done / elapsed
            text += f", {rate:.1f} {self.unit}/s"
            if self.done < self.total:
                text += f", eta {_duration((self.total - self.done) / rate)}"
            else:
                text += f", {_duration(elapsed)}"
        return text


@contextmanager
def progress_bar(total: int, description: str, *, enabled: bool = True, unit: str = "tiles") -> Iterator[Advance]:
    """Progress on stderr, silent under --quiet: a Rich bar (done/total, rate, ETA) on a
    terminal, :class:`ProgressLines` when stderr goes to a file or pipe (a log).

    Yields a callable ``advance(n=1)``.
    """
    if not enabled or state.quiet:
        yield _no_advance
        return
    if not state.err.is_terminal:
        yield ProgressLines(total, description, unit=unit)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=state.err, transient=False) as progress:
        task = progress.add_task(description, total=total, rate="")

        def advance(n: int = 1) -> None:
            progress.advance(task, n)
            speed = progress.tasks[0].speed
            if speed:
                progress.update(task, rate=f"{speed:.1f} {unit}/s")

        yield advance


def _bar_when_worth_it(total: int, *, description: str, unit: str) -> AbstractContextManager[Advance]:
    return progress_bar(total, description, enabled=total > 1, unit=unit)


def task_progress(description: str, *, unit: str = "tiles") -> TaskProgress:
    """The :class:`TaskProgress` a command hands to a task: a Rich bar named ``description``
    on stderr, shown when there is more than one unit of work and not under --quiet."""
    return functools.partial(_bar_when_worth_it, description=description, unit=unit)


@contextmanager
def progress_scope(progress: TaskProgress | None, total: int) -> Iterator[Advance]:
    """Inside a task: ``with progress_scope(progress, total) as advance`` (a no-op advance
    when ``progress`` is None)."""
    if progress is None:
        yield _no_advance
        return
    with progress(total) as advance:
        yield advance
