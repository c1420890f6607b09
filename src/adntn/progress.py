"""Progress reporting without printing from the library.

Library functions take a :class:`Progress` and call ``progress.task(description, total)`` to get an
``advance(done, loss)`` callback, and wrap each pipeline stage in ``with progress.stage(name):``
(its wall time reaches ``stage_done``). :class:`Silent` ignores everything; the CLI passes
:class:`RichProgress`, which draws rich progress bars on stderr.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as _RichProgress, TextColumn, TimeElapsedColumn

Advance = Callable[[int, float | None], None]


class Progress:
    """Receives progress; the base class is silent."""

    def task(self, description: str, total: int) -> Advance:
        return lambda done, loss=None: None

    def note(self, message: str) -> None:
        """A sentence worth telling the user (e.g. a warning about the fit)."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the stage ``name`` run inside; ``stage_done`` hears of it when it ends."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_done(name, time.perf_counter() - start)

    def stage_done(self, name: str, seconds: float) -> None:
        """A stage ended after ``seconds`` (the speed benchmark records these)."""


Silent = Progress


class RichProgress(Progress):
    """Rich progress bars and notes on stderr; use as a context manager."""

    def __init__(self) -> None:
        self.started = False  # the bars start with the first task: a run refused before any leaves stderr as is
        self.console = Console(stderr=True)
        # a terminal redraws the bars; a log (no terminal) gets one line per finished task, in
        # order with the notes (rich would print every bar only when the run ends)
        self.live = self.console.is_terminal
        self.bars = _RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), console=self.console, transient=False,
        )

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.bars.stop()

    def task(self, description: str, total: int) -> Advance:
        if not self.live:
            return self._logged_task(description, total)
        if not self.started:
            self.bars.start()
            self.started = True
        task_id = self.bars.add_task(description, total=total, loss="")

        def advance(done: int, loss: float | None = None) -> None:
            self.bars.update(task_id, completed=done, loss="" if loss is None else f"loss {loss:.4g}")

        return advance

    def _logged_task(self, description: str, total: int) -> Advance:
        """``advance`` that prints one line when the task reaches ``total``."""
        start, logged = time.perf_counter(), False

        def advance(done: int, loss: float | None = None) -> None:
            nonlocal logged
            if done >= total and not logged:
                logged = True
                elapsed = datetime.timedelta(seconds=int(time.perf_counter() - start))
                shown = "" if loss is None else f" loss {loss:.4g}"
                self.console.print(f"[bold]{description}[/] {done}/{total}{shown} {elapsed}", highlight=False)

        return advance

    def note(self, message: str) -> None:
        self.console.print(f"[yellow]note:[/] {message}")
