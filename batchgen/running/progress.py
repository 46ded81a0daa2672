"""What a run tells the person watching: a rich progress bar on a terminal, one plain line per
event otherwise (cron, CI), nothing but errors with `--quiet`. Every plain line also goes to
the run folder's run.log, whichever is on screen.
"""

from __future__ import annotations

import sys
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from batchgen.store.files import RunLog


class Reporter(Protocol):
    def start(self, total: int) -> None: ...
    def job_finished(self, line: str, ok: bool) -> None: ...
    def message(self, line: str) -> None: ...
    def warning(self, line: str) -> None: ...
    def close(self) -> None: ...


class _Speed(TextColumn):
    """Images per second over the run so far."""

    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):  # type: ignore[no-untyped-def]
        elapsed = task.elapsed or 0.0
        speed = task.completed / elapsed if elapsed > 0 else 0.0
        return f"{speed:.2f} img/s"


class PlainReporter:
    """A line per event on stdout: what cron mails and CI logs keep."""

    def __init__(self, log: RunLog, quiet: bool = False) -> None:
        self.log = log
        self.quiet = quiet
        self.total = 0
        self.finished = 0

    def start(self, total: int) -> None:
        self.total = total

    def job_finished(self, line: str, ok: bool) -> None:
        self.finished += 1
        text = f"[{self.finished}/{self.total}] {line}"
        self.log.line(text)
        if not self.quiet or not ok:
            print(text, file=sys.stdout if ok else sys.stderr, flush=True)

    def message(self, line: str) -> None:
        self.log.line(line)
        if not self.quiet:
            print(line, flush=True)

    def warning(self, line: str) -> None:
        """Shown even with --quiet, on stderr."""
        self.log.line(f"warning: {line}")
        print(f"warning: {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class RichReporter:
    """A progress bar with ETA and images/s; finished jobs scroll above it."""

    def __init__(self, log: RunLog) -> None:
        self.log = log
        self.console = Console()
        self.progress = Progress(
            TextColumn("[bold]batchgen[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            _Speed(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task: TaskID | None = None

    def start(self, total: int) -> None:
        self.task = self.progress.add_task("run", total=total)  # the clock starts here
        self.progress.start()

    def job_finished(self, line: str, ok: bool) -> None:
        self.log.line(line)
        self.progress.console.print(Text(line, style="" if ok else "red"), highlight=False)
        if self.task is not None:
            self.progress.advance(self.task)

    def message(self, line: str) -> None:
        self.log.line(line)
        self.progress.console.print(line, markup=False, highlight=False)

    def warning(self, line: str) -> None:
        self.log.line(f"warning: {line}")
        self.progress.console.print(
            Text(f"warning: {line}", style="bold yellow"), markup=False, highlight=False
        )

    def close(self) -> None:
        self.progress.stop()


def make_reporter(log: RunLog, quiet: bool = False) -> Reporter:
    if sys.stdout.isatty() and not quiet:
        return RichReporter(log)
    return PlainReporter(log, quiet)
