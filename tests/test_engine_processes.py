"""Engine processes die with the process that owns them (a watchdog), and any left behind by a killed run worker
are reaped before the next engine loads."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import psutil
import pytest

from resources.engine_processes import read_records, reap_orphaned_engines, record_engine
from tests.support.environment import instance_env
from tests.support.files import REPO, write_jsonl
from tests.support.request_lines import chat_lines
from tests.support.services import VLLM_BATCH
from tests.support.waiting import wait_for

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


def logs_under(folder: Path) -> list[str]:
    """The text of every log a run under `folder` may write: its stderr, compute logs and the CLI's log files."""
    return [log.read_text(errors="replace") for pattern in ("*.err", "*.log") for log in folder.rglob(pattern)]


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
            watchdogs = watchdogs_of(owner.pid)
            if ending == "exit":
                owner.communicate("go\n", timeout=30)
            else:
                owner.send_signal(signal.SIGKILL if ending == "sigkill" else signal.SIGTERM)
                owner.wait(timeout=30)
            assert not running(engine, 10), "the engine outlived its owner"
            assert watchdogs, "no watchdog started"
            assert not running(watchdogs, 5), "the watchdog must leave with the engine"
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



# ---- the real CPU engine ------------------------------------------------------------------------


def test_a_sigkilled_vllm_batch_run_takes_its_engine_with_it(tmp_path: Path, tiny_model: Path):
    env = instance_env(tmp_path, VBATCH_CHUNK_SIZE="10", VBATCH_MAX_NUM_SEQS="8")
    batch = write_jsonl(tmp_path / "big.jsonl", chat_lines(300, max_tokens=64))
    chunks = tmp_path / "data" / "batches" / "big" / "chunks"
    with (tmp_path / "run.err").open("w+") as stderr:
        run = subprocess.Popen(VLLM_BATCH + ["run", str(batch), "--model", str(tiny_model), "--model-name", "tiny",
                                      "--batch-id", "big"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=stderr, start_new_session=True)
        descendants: list[psutil.Process] = []
        try:
            wait_for(lambda: run.poll() is not None or list(chunks.glob("chunk-*.parquet")), 400, "a first chunk")
            assert run.poll() is None, "the run ended before it could be killed; make the batch bigger"
            # Recorded before the kill: vLLM's process titles hide the environment that would name them later.
            descendants = psutil.Process(run.pid).children(recursive=True)
            assert any("EngineCore" in p.name() for p in descendants), [p.name() for p in descendants]
            run.send_signal(signal.SIGKILL)  # the OOM killer, a CI timeout: no chance to clean up
            run.wait()
            left = running(descendants, 15)
            assert not left, f"still running 15 s after the run was killed: {[(p.pid, p.name()) for p in left]}"
            assert not running(watchdogs_of(run.pid), 5)
            # The watchdog writes to the owner's stderr: here `vllm-batch run`'s log file (the quiet console sends
            # what is not the command's own there) or the step's compute log, where the engine loaded.
            assert any("engine watchdog: pid" in text for text in logs_under(tmp_path))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
            kill_all(descendants + watchdogs_of(run.pid))


def test_a_sigkilled_engine_host_takes_its_engine_with_it(tmp_path: Path, tiny_model: Path):
    from resources.engine_host_client import attach, stop_host
    from resources.engine_types import EngineDied, EngineRequest
    from resources.engine_wire import SamplingSpec
    from resources.vllm_engine import VLLMEngine

    kwargs = VLLMEngine(dtype="float32", max_model_len=1024, enforce_eager=True).engine_kwargs(str(tiny_model))
    state = tmp_path / "engines"
    client = attach(state, kwargs, idle_seconds=600)
    engine: list[psutil.Process] = []
    try:
        host = psutil.Process(client.host_pid)
        engine = host.children(recursive=True)
        assert any("EngineCore" in p.name() for p in engine), [p.name() for p in engine]
        # One short request and long ones: after the short one comes back, the long ones are still running.
        requests = [EngineRequest(key, client.tokenizer.encode(f"Question number {key}?"),
                                  SamplingSpec({"max_tokens": 8 if key == 0 else 900, "temperature": 0,
                                                "ignore_eos": True}), "/v1/completions", False, 0)
                    for key in range(4)]
        stream = client.stream(requests)
        next(stream)
        host.kill()
        left = running(engine, 15)
        assert not left, f"still running 15 s after the host was killed: {[(p.pid, p.name()) for p in left]}"
        with pytest.raises(EngineDied):
            list(stream)
        assert not running(watchdogs_of(host.pid), 5)
        assert "engine watchdog: pid" in (state / "host.log").read_text()
    finally:
        client.shutdown()
        stop_host(state)
        kill_all(engine)


def test_a_finished_run_leaves_no_engine_process_and_no_watchdog(tmp_path: Path, tiny_model: Path):
    batch = write_jsonl(tmp_path / "small.jsonl", chat_lines(20, max_tokens=8))
    with (tmp_path / "run.err").open("w") as stderr:
        run = subprocess.Popen(VLLM_BATCH + ["run", str(batch), "--model", str(tiny_model), "--model-name", "tiny"],
                               env=instance_env(tmp_path), cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
                               start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    names: dict[int, str] = {}
    watchdogs: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 400
        while run.poll() is None and time.monotonic() < deadline:  # every process the run starts, engine included
            with contextlib.suppress(psutil.Error):
                for process in psutil.Process(run.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        names[process.pid] = process.name()
                        seen[process.pid] = process
            watchdogs.update({p.pid: p for p in watchdogs_of(run.pid)})
            time.sleep(0.2)
        run.wait(timeout=60)
        assert run.returncode == 0, (tmp_path / "run.err").read_text()[-2000:]
        assert any("EngineCor" in name for name in names.values()), names  # titles are cut at 15 bytes
        assert watchdogs, "the engine had no watchdog"
        left = running(list(seen.values()) + list(watchdogs.values()), 5)
        assert not left, [(p.pid, names.get(p.pid, "watchdog")) for p in left]
        # The engine was shut down by its owner, not stopped by the watchdog.
        assert not any("engine watchdog" in text for text in logs_under(tmp_path))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        kill_all(list(seen.values()) + list(watchdogs.values()))
