"""Progress bars and stage timings on stderr, so stdout stays clean for the tables."""

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
    """One progress bar per long step; `quiet` turns the bars off (tests, --quiet)."""

    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.quiet = quiet
        self.console = console or stderr

    @contextmanager
    def step(self, description: str, total: int | None) -> Iterator[Advance]:
        """A bar for `total` units of work (None: a spinner); yields `advance(n)`."""
        if self.quiet:
            yield lambda n=1: None
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n=1: progress.advance(task, n)
            if total is None:
                progress.update(task, total=1, completed=1)

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)


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
