"""`vllm-batch start`: one supervisor per instance, and its daemon and webserver end with it, however it ends."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil

from tests.support.environment import clean_environ
from tests.support.files import REPO
from tests.support.ports import free_port
from tests.support.processes import children_running
from tests.support.waiting import wait_for


def test_a_killed_supervisor_takes_its_daemon_and_webserver_with_it(tmp_path: Path):
    env = clean_environ()
    env.update(VBATCH_HOME=str(REPO), VBATCH_DATA_DIR=str(tmp_path / "data"), DAGSTER_HOME=str(tmp_path / "dagster"))
    command = [sys.executable, "-m", "batch_pipeline.entrypoints.cli", "start", "--port", str(free_port())]
    first = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        supervisor = psutil.Process(first.pid)
        daemon = wait_for(lambda: children_running(supervisor, "dagster-daemon"), 120, "the daemon to start",
                          watch=[first])[0]
        webserver = wait_for(lambda: children_running(supervisor, "dagster-webserver"), 120, "the webserver",
                             watch=[first])[0]

        second = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines()[-1].startswith(
            f"error: vllm-batch start is already running on this instance ({tmp_path / 'dagster'}, pid {first.pid})")

        first.send_signal(signal.SIGKILL)  # no chance to stop its children itself
        first.wait(30)
        gone, alive = psutil.wait_procs([daemon, webserver], timeout=60)
        assert not alive, f"left running after the supervisor died: {[p.cmdline()[:2] for p in alive]}"

        # The kernel released the lock with the dead supervisor: a new one starts.
        third = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(lambda: children_running(third.pid, "dagster-daemon"), 120, "a new daemon", watch=[third])
        finally:
            third.send_signal(signal.SIGTERM)
            third.wait(120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
