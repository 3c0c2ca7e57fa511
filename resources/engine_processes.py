"""A record of which engine processes belong to which run worker, so a killed worker's engine is reaped.

vLLM starts its engine core (and, on some platforms, worker processes) as children of the process
that builds `vllm.LLM`. When that process dies by SIGKILL or OOM, the children are not told: they
are re-parented to init and keep their GPU memory, so the next run's engine cannot load. Each
loaded engine therefore leaves a small JSON record `<worker pid>.json` in the state folder; before a
new engine loads, every record whose worker is gone has its processes killed and is removed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


def _identity(process: psutil.Process) -> list:
    # (pid, start time) survives pid reuse: a new process with an old pid has another start time.
    return [process.pid, process.create_time()]


def child_processes() -> set[int]:
    """The pids of this process's descendants."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


def record_engine(state_dir: Path, engine_pids: set[int], model: str, run_id: str | None = None) -> None:
    """Remember that this process owns `engine_pids`."""
    state_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    for pid in sorted(engine_pids):
        try:
            processes.append(_identity(psutil.Process(pid)))
        except psutil.Error:
            continue
    record = {"worker": _identity(psutil.Process()), "engine": processes, "model": model, "run_id": run_id}
    target = state_dir / f"{os.getpid()}.json"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, target)


def forget_engine(state_dir: Path) -> None:
    """Drop this process's record (its engine was shut down cleanly)."""
    (state_dir / f"{os.getpid()}.json").unlink(missing_ok=True)


def read_records(state_dir: Path) -> list[dict]:
    """Every engine record in the state folder."""
    records = []
    for path in sorted(state_dir.glob("*.json")) if state_dir.is_dir() else []:
        try:
            records.append(dict(json.loads(path.read_text()), path=str(path)))
        except (OSError, json.JSONDecodeError):
            continue
    return records


def _alive(identity: list) -> psutil.Process | None:
    pid, started = identity
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started) < 1e-3 and process.status() != psutil.STATUS_ZOMBIE:
            return process
    except psutil.Error:
        pass
    return None


def reap_orphaned_engines(state_dir: Path) -> list[int]:
    """Kill the engine processes of workers that died without shutting them down; returns their pids."""
    reaped = []
    for record in read_records(state_dir):
        if _alive(record["worker"]) is not None:
            continue  # a live worker (another run, or this one) owns it
        for identity in record["engine"]:
            process = _alive(identity)
            if process is None:
                continue
            try:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=10)
            except psutil.NoSuchProcess:
                pass
            except psutil.Error as exc:
                log.warning("could not kill orphaned engine process %s: %s", identity[0], exc)
                continue
            reaped.append(identity[0])
        Path(record["path"]).unlink(missing_ok=True)
    if reaped:
        log.warning("killed %d engine process(es) left behind by a dead run worker: %s", len(reaped), reaped)
    return reaped


def engine_process_facts(env_names: list[str]) -> list[dict]:
    """This process's children as the kernel sees them: the given variables of their environment and the
    cores they may run on (how a test or an operator checks that two engines do not share a device)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            environ = process.environ()
            found.append({"pid": process.pid, "name": process.name(), "cpus": sorted(process.cpu_affinity() or []),
                          "env": {name: environ.get(name) for name in env_names}})
        except psutil.Error:
            continue
    return found
