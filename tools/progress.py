"""Progress of long work, the same way in every `torpor` command: through rich.

On a terminal a live bar (or, without a total, a live line) that redraws in place; when the
output is not a terminal (a pipe, a log file, CI) one plain line per interval, so a log shows
the work advancing without a wall of carriage returns. Progress goes to stderr by default:
stdout keeps the results a script may parse.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

# Seconds between two plain lines when the output is not a terminal.
PLAIN_INTERVAL_S = 1.0


class ProgressLine:
    """`with ProgressLine("wakes", total=5) as p: p.update(done, "status text")`.

    `total` None: no bar, only the status text and the elapsed time. `live` forces the
    terminal (True) or the plain (False) form; by default it follows `stream.isatty()`.
    """

    def __init__(
        self,
        description: str,
        total: float | None = None,
        *,
        stream: IO[str] | None = None,
        live: bool | None = None,
        interval_s: float = PLAIN_INTERVAL_S,
        unit: str = "",
    ) -> None:
        self.description = description
        self.total = total
        self.interval_s = interval_s
        self.unit = unit
        out = stream if stream is not None else sys.stderr
        self.console = Console(file=out, highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal if live is None else live
        self.completed: float = 0
        self.text = ""
        self._t0 = time.monotonic()
        self._last_plain = -interval_s  # the first update prints at once
        self._printed = ""
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressLine:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> ProgressLine:
        if self.live and self._progress is None:
            columns = [SpinnerColumn(), TextColumn("[bold]{task.description}")]
            if self.total is not None:
                columns += [BarColumn(), MofNCompleteColumn()]
            columns += [TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
            self._progress = Progress(*columns, console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, status="")
        return self

    def update(self, completed: float | None = None, text: str | None = None) -> None:
        """Record progress; on a terminal it is redrawn, otherwise printed at most once per
        interval."""
        if completed is not None:
            self.completed = completed
        if text is not None:
            self.text = text
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=self.completed, status=self.text)
            return
        if not self.live and time.monotonic() - self._last_plain >= self.interval_s:
            self._plain()

    def log(self, text: str) -> None:
        """A line of its own (an event), above the live bar or between the plain lines."""
        self.console.print(text, markup=False)

    def close(self) -> None:
        """Stop the live display, or print the final plain line if it was not printed yet."""
        if self._progress is not None:
            if self._task is not None:
                self._progress.update(self._task, completed=self.completed, status=self.text)
            self._progress.stop()
            self._progress = None
            return
        if not self.live and self.plain_text() != self._printed:
            self._plain()

    def plain_text(self) -> str:
        parts = [f"[{self.description}]"]
        if self.total is not None:
            unit = f" {self.unit}" if self.unit else ""
            parts.append(f"{self.completed:g}/{self.total:g}{unit}")
        if self.text:
            parts.append(self.text)
        parts.append(f"({time.monotonic() - self._t0:.0f} s)")
        return " ".join(parts)

    def _plain(self) -> None:
        self._last_plain = time.monotonic()
        text = self.plain_text()
        # The elapsed time alone changing is no news: compare without it.
        key = text.rpartition(" (")[0]
        if key == self._printed.rpartition(" (")[0] and self._printed:
            return
        self._printed = text
        self.console.print(text, markup=False)
