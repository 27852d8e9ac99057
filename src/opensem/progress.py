"""Progress with an ETA for the long stages: a live bar on a terminal (rich); elsewhere (a pipe, a log file, CI, a
launch job's log) one plain line every ``OPENSEM_PROGRESS_SECONDS`` (30) seconds and at every tenth of the work, so
a long forge is never silent."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from opensem.terminal import Console


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressLines:
    """``advance(n)`` for a console that is not a terminal: a line with done/total, rate and ETA when ``every_s``
    seconds have passed since the last one, or the work crossed another tenth, and at the end."""

    def __init__(self, console: Console, label: str, total: int, every_s: float):
        self.console, self.label, self.total, self.every_s = console, label, max(total, 0), every_s
        self.done, self.start = 0, time.monotonic()
        self.last_time, self.last_tenth = self.start, 0

    def __call__(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        tenth = self.done * 10 // self.total if self.total else 10
        if now - self.last_time >= self.every_s or tenth > self.last_tenth or self.done >= self.total:
            self.last_time, self.last_tenth = now, tenth
            self.line(now)

    def line(self, now: float) -> None:
        spent = now - self.start
        rate = self.done / spent if spent > 0 else 0.0
        left = f", eta {_clock((self.total - self.done) / rate)}" if rate and self.done < self.total else ""
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        self.console.print(f"{self.label}: {self.done}/{self.total}{share}, {rate:.2f}/s, {_clock(spent)} elapsed{left}",
                           markup=False, highlight=False, soft_wrap=True)


@contextmanager
def stage_progress(console: Console, label: str, total: int):
    """Yields ``advance(n)``; shows done/total, elapsed time and the ETA."""
    if not console.is_terminal:
        lines = ProgressLines(console, label, total, float(os.environ.get("OPENSEM_PROGRESS_SECONDS", "30")))
        yield lines
        if lines.done < lines.total:  # stopped early (a budget, an error): say where
            lines.line(time.monotonic())
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as prog:
        task = prog.add_task(label, total=total)
        yield lambda n=1: prog.advance(task, n)
