"""The quiet console: a `vllm-batch` command shows its own lines; what its libraries print goes to a log file.

vLLM, torch, Triton and Dagster print from three places, and each needs its own catch:
- Python code in this process (vLLM's logger, `warnings`, loggers without a handler): sys.stdout and
  sys.stderr become copies of the console for the command's own lines, and the libraries are pointed
  at the original streams (`sys.__stderr__`), which write to the log;
- C++ code in this process (torch's `[W...]` lines) writes to file descriptors 1 and 2 directly;
- child processes (vLLM's engine core and workers, multiprocessing's resource tracker) inherit those
  two descriptors, so the log takes the place of the console on descriptors 1 and 2 for the command's
  lifetime and everything they print lands there too.
The project's own loggers (an engine that died and is replaced, a chunk that could not be recorded) keep
their warnings on the console as `warning: ...` lines. `-v` leaves all of it on the console, as before.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

_ROTATE_BYTES = 20 * 1024 * 1024  # a log past this is moved to <name>.1 when the next command starts
_OWN_LOGGERS = ("batch_pipeline", "resources", "assets", "integrations")  # this project's packages
# The last line of a Python traceback, bare or behind vLLM's "(Worker pid=1) ERROR ... [file.py:1] " prefix.
_ERROR_LINE = re.compile(r"^(?:.*\] )?([A-Z]\w*(?:Error|Exception)): (.+)$", re.M)


def log_path_for(data_dir: Path, command: str) -> Path:
    """Where a command's captured output goes: DATA_DIR/logs/vllm-batch-<command>.log."""
    return data_dir / "logs" / f"vllm-batch-{command}.log"


class QuietConsole:
    """Sends what libraries and child processes print to `log_path` until `close()`; the command's own lines
    (click.echo, the progress display) still reach the console through sys.stdout and sys.stderr."""

    def __init__(self, log_path: Path, command: str):
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if log_path.exists() and log_path.stat().st_size > _ROTATE_BYTES:
            log_path.replace(log_path.with_name(log_path.name + ".1"))
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        self._log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size_before = os.fstat(self._log_fd).st_size
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(self._log_fd, f"----- vllm-batch {command} (pid {os.getpid()}) {started} -----\n".encode())
        self._start_size = os.fstat(self._log_fd).st_size
        self._saved_fds = {fd: os.dup(fd) for fd in (1, 2)}
        self._saved_streams = (sys.stdout, sys.stderr)
        # A stream on descriptor 1 or 2 (the console, a pipe) gets a copy that keeps writing there; any other
        # (click's test runner's buffer) already is the command's own.
        sys.stdout = _console_copy(sys.stdout, 1)
        sys.stderr = _console_copy(sys.stderr, 2)
        for fd in (1, 2):
            os.dup2(self._log_fd, fd)
        self._saved_env = {name: os.environ.get(name) for name in _LIBRARY_ENV}
        os.environ.update(_LIBRARY_ENV)
        self._saved_showwarning = warnings.showwarning
        warnings.showwarning = _warning_to_log
        self._saved_last_resort = logging.lastResort
        # Records of loggers with no handler of their own (Dagster's, transformers') would otherwise use sys.stderr.
        logging.lastResort = logging.StreamHandler(_log_stream())
        logging.lastResort.setLevel(logging.WARNING)
        self._own_handler = logging.StreamHandler(sys.stderr)
        self._own_handler.setLevel(logging.WARNING)
        self._own_handler.setFormatter(_OwnLineFormatter())
        for name in _OWN_LOGGERS:
            logging.getLogger(name).addHandler(self._own_handler)

    def wrote(self) -> bool:
        """Whether anything reached the log since this command started."""
        return os.fstat(self._log_fd).st_size > self._start_size

    def first_error(self) -> str | None:
        """The first `SomeError: message` line written since the command started: the root cause, where a child
        process failed and the exception this process got says only "see root cause above"."""
        with open(self.log_path, "rb") as handle:
            handle.seek(self._start_size)
            match = _ERROR_LINE.search(handle.read().decode(errors="replace"))
        return f"{match[1]}: {match[2].strip()}" if match else None

    def close(self) -> None:
        """Put the console back on descriptors 1 and 2 and the streams back as they were."""
        for name in _OWN_LOGGERS:
            logging.getLogger(name).removeHandler(self._own_handler)
        warnings.showwarning = self._saved_showwarning
        logging.lastResort = self._saved_last_resort
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
        for fd, saved in self._saved_fds.items():
            os.dup2(saved, fd)
            os.close(saved)
        for copy, original in zip((sys.stdout, sys.stderr), self._saved_streams, strict=True):
            if copy is not original:
                copy.close()
        sys.stdout, sys.stderr = self._saved_streams
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if not self.wrote():  # a quiet command (`list`, `status`) leaves no header behind, nor an empty file
            os.ftruncate(self._log_fd, self._size_before)
            if self._size_before == 0:
                self.log_path.unlink(missing_ok=True)
        os.close(self._log_fd)


# vLLM writes its log lines to the stream this names, resolved when vLLM configures logging (at import, in this
# process and in each child): the original stderr object, which writes to descriptor 2, the log.
_LIBRARY_ENV = {"VLLM_LOGGING_STREAM": "ext://sys.__stderr__"}


def _console_copy(stream: TextIO, fd: int) -> TextIO:
    try:
        on_fd = stream.fileno() == fd
    except (AttributeError, OSError, io.UnsupportedOperation):
        on_fd = False
    if not on_fd:
        return stream
    # Buffered as Python buffers the stream it stands for: by line on a terminal and for stderr, else by block.
    by_line = fd == 2 or os.isatty(fd)
    return open(os.dup(fd), "w", buffering=1 if by_line else -1, encoding=stream.encoding, errors=stream.errors)


class _OwnLineFormatter(logging.Formatter):
    """`warning: the engine for tiny died; starting a new one`: the CLI's own error and warning style."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _log_stream() -> TextIO:
    return sys.__stderr__ if sys.__stderr__ is not None else sys.stderr


def _warning_to_log(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
    stream: Any = file or _log_stream()
    try:
        stream.write(warnings.formatwarning(message, category, filename, lineno, line))
    except (OSError, ValueError):
        pass
