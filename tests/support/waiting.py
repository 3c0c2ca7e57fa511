"""Waiting for a condition without hiding a crash: `wait_for`."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold within the timeout."""


def wait_for(predicate: Callable[[], T], timeout: float, what: str, *, interval: float = 0.5,
             watch: Iterable[subprocess.Popen] = (), log: Path | None = None,
             explain: Callable[[], str] | None = None, retry: tuple[type[BaseException], ...] = (Exception,)) -> T:
    """Poll `predicate` until it returns something truthy, and return that.

    An error of a `retry` type from the predicate counts as "not yet" (a server still starting, a database
    restarting), except AssertionError: a predicate asserts what must hold all along (`assert
    process.poll() is None`), so it ends the wait at once, as does any process of `watch` that exits.
    Every failure names `what`; it ends with the tail of `log` and what `explain()` says, if given.
    """
    watched = list(watch)
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        for process in watched:
            if process.poll() is not None:
                raise AssertionError(f"{_command(process)} exited with {process.returncode} while waiting for "
                                     f"{what}{_context(log, explain)}")
        try:
            value = predicate()
            if value:
                return value
        except AssertionError as exc:
            raise AssertionError(f"{exc} (while waiting for {what}){_context(log, explain)}") from exc
        except retry as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    last = f" (last error: {last_error!r})" if last_error is not None else ""
    raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}{last}{_context(log, explain)}")


def _command(process: subprocess.Popen) -> str:
    args = process.args if isinstance(process.args, list | tuple) else [process.args]
    return " ".join(str(arg) for arg in args[:4])


def _context(log: Path | None, explain: Callable[[], str] | None) -> str:
    parts = []
    if log is not None and log.exists():
        parts.append(f"--- {log.name} (last 3000 characters)\n{log.read_text(errors='replace')[-3000:]}")
    if explain is not None:
        try:
            parts.append(explain())
        except Exception as exc:  # the explanation must not hide the failure
            parts.append(f"(could not explain: {exc!r})")
    return "".join("\n" + part for part in parts)
