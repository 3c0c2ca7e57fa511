"""Starting and stopping a service process: its own process group, its output in a log file."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.files import REPO

VENV_BIN = Path(sys.executable).parent
VLLM_BATCH = [sys.executable, "-m", "batch_pipeline.entrypoints.cli"]


def start_process(args: list[str], env: dict[str, str], log: Path, append: bool = False) -> subprocess.Popen:
    """Start `args` in the repository folder in a session of its own (so that stopping it takes its children),
    its output going to `log`."""
    with log.open("a" if append else "w") as output:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_processes(*processes: subprocess.Popen | None, timeout: float = 60) -> None:
    """SIGTERM each process's group, wait for them all (up to `timeout` in all), then SIGKILL what is left."""
    running = [p for p in processes if p is not None]
    for process in running:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
