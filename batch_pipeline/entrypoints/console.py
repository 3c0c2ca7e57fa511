"""Progress on the console for `vllm-batch run` and `submit --wait`: a bar on a terminal, plain lines elsewhere.

The bar (rich) shows requests done / total, generated tokens per second and the time left; when
stderr is not a terminal (CI logs, `| tee`), a plain line is printed when the count moves, at most one
every few seconds, except the first with a rate and the last.

Tokens per second are counted as the run's summary counts them: tokens generated over the time from
the start of generation (`Snapshot.generating_since`: the engine ready and the batch's chunks
runnable) to the moment the count of tokens last grew. Tokens only show once a chunk is written, so a
rate taken between two polls would say 0 (or a burst) when chunks finish together at the end.
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
    generating_since: float | None = None  # time.monotonic() when generation began; None: not known
    tokens_per_second: float | None = None  # the run's own figure once it ended: the last line says the summary's


class ProgressDisplay:
    """Draws snapshots of one batch; use as a context manager around the wait."""

    def __init__(self, label: str, stream: TextIO | None = None, tty: bool | None = None, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval  # seconds between plain lines
        self.clock = clock  # time.monotonic(), the clock of Snapshot.generating_since
        self._started = clock()
        self._first_seen: float | None = None  # when a snapshot first said generation may have begun
        self._tokens: tuple[float, int] = (self._started, 0)  # when the count of tokens last grew, and to what
        self._last_plain: tuple[int, int, str] | None = None
        self._last_plain_at = float("-inf")
        self._rate_shown = False  # the first line with a rate, and the last line, are never held back
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

    def rate(self, snapshot: Snapshot) -> float | None:
        """Generated tokens per second since generation began (the engine load does not count), up to the
        last time the count of tokens grew; None before the first tokens."""
        if snapshot.tokens_per_second is not None:
            return snapshot.tokens_per_second
        now = self.clock()
        if self._first_seen is None:
            self._first_seen = now
        if snapshot.output_tokens != self._tokens[1]:
            self._tokens = (now, snapshot.output_tokens)
        seen_at, tokens = self._tokens
        since = self._generation_start(snapshot)
        if tokens == 0 or seen_at <= since:
            return None
        return tokens / (seen_at - since)

    def _generation_start(self, snapshot: Snapshot) -> float:
        if snapshot.generating_since is not None:
            return snapshot.generating_since
        return self._first_seen if self._first_seen is not None else self._started

    def show(self, snapshot: Snapshot) -> None:
        """Draw one snapshot."""
        rate = self.rate(snapshot)
        shown_rate = "" if rate is None else f"{rate:,.0f} tok/s"
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=snapshot.done, total=snapshot.total or None,
                                  rate=shown_rate, status=snapshot.status)
            return
        key = (snapshot.done, snapshot.total, snapshot.status)
        now = self.clock()
        news = (0 < snapshot.total == snapshot.done) or (rate is not None and not self._rate_shown)
        if key == self._last_plain or (now - self._last_plain_at < self.interval and not news):
            return  # unchanged, or too soon after the last line (a later call prints it)
        self._last_plain, self._last_plain_at = key, now
        self._rate_shown = self._rate_shown or rate is not None
        eta = ""
        if rate is not None and 0 < snapshot.done < snapshot.total:  # from generation alone, not the engine load
            elapsed = now - self._generation_start(snapshot)
            eta = f", ETA {_clock(elapsed * (snapshot.total - snapshot.done) / snapshot.done)}"
        status = f" [{snapshot.status}]" if snapshot.status else ""
        rate_text = f", {shown_rate}" if shown_rate else ""
        print(f"progress: {snapshot.done}/{snapshot.total} requests{rate_text}{eta}{status}",
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
