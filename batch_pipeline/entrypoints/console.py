"""Progress on the console for `vllm-batch run` and `submit --wait`: a bar on a terminal, plain lines elsewhere.

The bar (rich) shows requests done / total, generated tokens per second and the time left; when
stderr is not a terminal (CI logs, `| tee`), one plain line is printed each time the count moves.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn


@dataclass(frozen=True)
class Snapshot:
    """How far a batch is."""

    done: int
    total: int
    output_tokens: int
    status: str = ""


class ProgressDisplay:
    """Draws snapshots of one batch; use as a context manager around the wait."""

    def __init__(self, label: str, stream: TextIO | None = None, tty: bool | None = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._started = time.monotonic()
        self._first_tokens: tuple[float, int] | None = None
        self._last_plain: tuple[int, int, str] | None = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressDisplay:
        if self.tty:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("requests"),
                TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(file=self.stream), transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=None, rate="", status="")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def rate(self, snapshot: Snapshot) -> float:
        """Generated tokens per second since tokens were first seen (the engine load does not count)."""
        now = time.monotonic()
        if self._first_tokens is None:
            if snapshot.output_tokens == 0:
                return 0.0
            self._first_tokens = (now, snapshot.output_tokens)
        since, tokens = self._first_tokens
        return (snapshot.output_tokens - tokens) / (now - since) if now > since else 0.0

    def show(self, snapshot: Snapshot) -> None:
        """Draw one snapshot."""
        rate = self.rate(snapshot)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=snapshot.done, total=snapshot.total or None,
                                  rate=f"{rate:,.0f} tok/s", status=snapshot.status)
            return
        key = (snapshot.done, snapshot.total, snapshot.status)
        if key == self._last_plain:
            return
        self._last_plain = key
        eta = ""
        elapsed = time.monotonic() - self._started
        if 0 < snapshot.done < snapshot.total:
            eta = f", ETA {_clock(elapsed * (snapshot.total - snapshot.done) / snapshot.done)}"
        status = f" [{snapshot.status}]" if snapshot.status else ""
        print(f"progress: {snapshot.done}/{snapshot.total} requests, {rate:,.0f} tok/s{eta}{status}",
              file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressWatcher:
    """Polls `read` on a thread and shows each snapshot, for work that blocks the calling thread."""

    def __init__(self, display: ProgressDisplay, read: Callable[[], Snapshot | None], interval: float = 0.5):
        self.display = display
        self.read = read
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def _loop(self) -> None:
        while True:
            stopping = self._stop.wait(self.interval)
            try:
                snapshot = self.read()
            except Exception:  # a progress read racing a file being replaced: show the next one
                snapshot = None
            if snapshot is not None:
                self.display.show(snapshot)
            if stopping:
                return

    def __enter__(self) -> ProgressWatcher:
        self.display.__enter__()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.display.__exit__(kind, exc, tb)
