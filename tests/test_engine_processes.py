"""Engine processes die with the process that owns them (a watchdog), and any left behind by a killed run worker
are reaped before the next engine loads."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import psutil
import pytest

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


# ---- the watchdog: an engine dies with the process that owns it ----------------------------------

# A stand-in owner: its "engine core" starts a "worker" of its own, as vLLM's does, and ignores SIGTERM
# (an orphaned core was seen doing so for 80 minutes). Once told to go on, the owner ends as argv[1] says.
_OWNER = """
import subprocess, sys, time
import psutil
from resources.engine_processes import guard_engine
core = subprocess.Popen([sys.executable, "-c", "import signal, subprocess, time; "
                         "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                         "subprocess.Popen(['sleep', '120']); time.sleep(120)"], stdout=subprocess.DEVNULL)
while not psutil.Process(core.pid).children():
    time.sleep(0.05)
guard_engine({core.pid})
print(core.pid, psutil.Process(core.pid).children()[0].pid, flush=True)
sys.stdin.readline()
if sys.argv[1] == "exit":
    sys.exit(0)  # without shutting its engine down
if sys.argv[1] == "shutdown":
    psutil.Process(core.pid).children()[0].kill()
    core.kill()
    core.wait()
time.sleep(120)
"""


def start_owner(ending: str, stderr: IO) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """The stand-in owner and its engine (core and worker), guarded and waiting to be told to go on."""
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, ending], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert owner.stdout is not None
    return owner, [psutil.Process(int(pid)) for pid in owner.stdout.readline().split()]


def watchdogs_of(owner_pid: int) -> list[psutil.Process]:
    """The engine watchdogs that guard the engine of `owner_pid` (no process's children: found by command line)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(part.endswith("engine_processes.py") for part in cmdline) and f'"owner": [{owner_pid},' in cmdline[-1]:
            found.append(process)
    return found


def running(processes: list[psutil.Process], within: float) -> list[psutil.Process]:
    """Those of `processes` still running (zombies count as gone) after waiting up to `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        still = []
        for process in processes:
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    still.append(process)
        if not still or time.monotonic() > deadline:
            return still
        time.sleep(0.2)


def kill_all(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()


@pytest.mark.parametrize("ending", ["sigkill", "sigterm", "exit"])
def test_a_guarded_engine_dies_with_its_owner_however_the_owner_ends(tmp_path: Path, ending: str):
    with (tmp_path / "owner.err").open("w+") as stderr:
        owner, engine = start_owner(ending, stderr)
        try:
            assert watchdogs_of(owner.pid), "no watchdog started"
            if ending == "exit":
                owner.communicate("go\n", timeout=30)
            else:
                owner.send_signal(signal.SIGKILL if ending == "sigkill" else signal.SIGTERM)
                owner.wait(timeout=30)
            assert not running(engine, 10), "the engine outlived its owner"
            assert not running(watchdogs_of(owner.pid), 5), "the watchdog must leave with the engine"
            stderr.seek(0)
            assert "engine watchdog: pid" in stderr.read()
        finally:
            owner.kill()
            kill_all(engine + watchdogs_of(owner.pid))


def test_the_watchdog_leaves_when_the_engine_is_shut_down_and_its_owner_lives_on():
    owner, engine = start_owner("shutdown", subprocess.DEVNULL)
    try:
        watchdogs = watchdogs_of(owner.pid)
        assert watchdogs, "no watchdog started"
        assert owner.stdin is not None
        owner.stdin.write("go\n")
        owner.stdin.flush()
        assert not running(watchdogs, 10), "the watchdog outlived the engine it guarded"
        assert owner.poll() is None
        assert not running(engine, 5)
    finally:
        owner.kill()
        owner.wait()
        kill_all(engine + watchdogs_of(owner.pid))


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
