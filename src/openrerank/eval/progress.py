"""Progress on stderr (bars on a terminal, a plain line every few seconds in logs), stdout stays for the tables."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Advance = Callable[[int], None]

stderr = Console(stderr=True)


class Reporter:
    """One progress bar per long step on a terminal; when stderr is not a terminal (CI, `nohup`, a log file) a
    plain line every `every` seconds with the count, rate and ETA. `quiet` turns both off (tests, --quiet)."""

    def __init__(self, quiet: bool = False, console: Console | None = None, every: float = 5.0) -> None:
        self.quiet = quiet
        self.console = console or stderr
        self.every = every

    @contextmanager
    def step(self, description: str, total: int | None) -> Iterator[Advance]:
        """A bar for `total` units of work (None: a spinner); yields `advance(n)`."""
        if self.quiet:
            yield lambda n=1: None
            return
        if not self.console.is_terminal:
            yield from self._lines(description, total)
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n=1: progress.advance(task, n)
            if total is None:
                progress.update(task, total=1, completed=1)

    def _lines(self, description: str, total: int | None) -> Iterator[Advance]:
        start = last = time.monotonic()
        done = 0

        def advance(n: int = 1) -> None:
            nonlocal done, last
            done += n
            now = time.monotonic()
            if now - last >= self.every and total:
                last = now
                self._print(progress_line(description, done, total, now - start))

        self._print(f"{description}: started" + (f" ({total:,} to do)" if total else ""))
        yield advance
        self._print(f"{description}: done" + (f" {done:,}/{total:,}" if total else "")
                    + f" in {time.monotonic() - start:.1f}s")

    def _print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)


def progress_line(description: str, done: int, total: int, elapsed: float) -> str:
    """`encode corpus: 1,200/5,183 (23%), 150.2/s, ETA 27s`"""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
    return f"{description}: {done:,}/{total:,} ({100 * done / total:.0f}%), {rate:.1f}/s, ETA {eta}"


class Stopwatch:
    """Accumulates wall seconds per named stage (index, encode, retrieve, fuse, rerank, score)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
