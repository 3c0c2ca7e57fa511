"""Engine processes left behind by a killed run worker are reaped before the next engine loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

from resources.engine_processes import read_records, reap_orphaned_engines, record_engine
from tests.conftest import REPO

# A stand-in run worker: it starts a long-lived child (the "engine"), records it, and dies without
# stopping it, the way a SIGKILLed worker leaves vLLM's EngineCore behind.
_WORKER = """
import subprocess, sys
from pathlib import Path
from resources.engine_processes import record_engine
quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}  # or run() waits for its pipes
engine = subprocess.Popen(["sleep", "120"], start_new_session=True, **quiet)
record_engine(Path(sys.argv[1]), {engine.pid}, "tiny")
print(engine.pid)
"""


def test_engines_of_a_dead_worker_are_killed_and_a_live_workers_are_kept(tmp_path: Path):
    state = tmp_path / "engines"
    dead = subprocess.run([sys.executable, "-c", _WORKER, str(state)], cwd=REPO, capture_output=True, text=True,
                          check=True)
    orphan = psutil.Process(int(dead.stdout))
    assert orphan.is_running()

    live_engine = subprocess.Popen(["sleep", "120"])
    try:
        record_engine(state, {live_engine.pid}, "tiny")  # this test process is a live worker
        assert reap_orphaned_engines(state) == [orphan.pid]
        assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
        assert live_engine.poll() is None  # a live worker's engine is left alone
        assert [r["worker"][0] for r in read_records(state)] == [psutil.Process().pid]
        assert reap_orphaned_engines(state) == []  # idempotent
    finally:
        live_engine.kill()
        live_engine.wait()
        if orphan.is_running():
            orphan.kill()
