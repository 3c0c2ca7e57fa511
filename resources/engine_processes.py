"""A record of which engine processes belong to which run worker, so a killed worker's engine is reaped.

vLLM starts its engine core (and, on some platforms, worker processes) as children of the process
that builds `vllm.LLM`. When that process dies by SIGKILL or OOM, the children are not told: they
are re-parented to init and keep their GPU memory, so the next run's engine cannot load. Each
loaded engine therefore leaves a small JSON record `<worker pid>.json` in the state folder; before a
new engine loads, every record whose worker is gone has its processes killed and is removed.

That record only helps once a next engine loads in the same data folder. So each engine is also
guarded (`guard_engine`): a small watchdog process waits, through pidfds, for the engine's owner
to exit (normally, by SIGTERM or by SIGKILL) and then stops the engine's processes within seconds.
PR_SET_PDEATHSIG cannot do this: vLLM spawns its engine core itself (nothing of ours runs in the
child before its own code), its workers are the core's children, and the signal follows the
creating *thread*: `vllm-batch run` loads the engine on a pool thread that ends right after the load.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
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


# ---- the watchdog: an engine dies with the process that owns it ----------------------------------


def guard_engine(engine_pids: set[int]) -> None:
    """Have a watchdog stop the engine processes `engine_pids` as soon as this process exits, however it exits."""
    engine: list[list] = []
    companions: list[list] = []
    for pid in sorted(engine_pids):
        try:
            process = psutil.Process(pid)
            # multiprocessing's resource tracker is this process's, not the engine's (a second engine
            # uses it too): it is stopped with the engine only once this process is gone.
            (companions if _is_resource_tracker(process) else engine).append(_identity(process))
        except psutil.Error:
            continue
    if not engine:
        return
    spec = {"owner": _identity(psutil.Process()), "engine": engine, "companions": companions}
    # -I: the watchdog imports only the standard library and psutil, whatever this process's sys.path.
    # It double-forks (see _watch), so this waits only for the fork, and the watchdog is nobody's child.
    try:
        subprocess.run([sys.executable, "-I", __file__, json.dumps(spec)], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, start_new_session=True, check=False, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:  # the engine still works; reap_orphaned_engines remains
        log.warning("could not start the engine watchdog (the engine may outlive this process): %s", exc)


def _is_resource_tracker(process: psutil.Process) -> bool:
    try:
        return any("multiprocessing.resource_tracker" in part for part in process.cmdline())
    except psutil.Error:
        return False


def _pidfd(identity: list) -> int | None:
    """A pidfd for the process `identity` (readable once it exits); None if it is gone already."""
    try:
        fd = os.pidfd_open(identity[0])
    except ProcessLookupError:
        return None
    if _alive(identity) is None:  # the pid now names another process: ours is gone
        os.close(fd)
        return None
    return fd


def _watch(spec: dict) -> None:
    """The watchdog: wait until the owner or every engine process has exited; in the first case stop the engine."""
    if os.fork():
        os._exit(0)  # the watchdog proper is re-parented: never a zombie of the owner, nor one of its children
    owner, engine = spec["owner"], spec["engine"]
    try:
        fds = {identity[0]: _pidfd(identity) for identity in [owner, *engine]}
    except (AttributeError, OSError):  # no pidfds (before Linux 5.3): look twice a second instead
        fds = None
    poller = select.poll()
    for fd in (fds or {}).values():
        if fd is not None:
            poller.register(fd, select.POLLIN)
    while True:
        if fds is None:
            alive = {identity[0] for identity in [owner, *engine] if _alive(identity) is not None}
        else:
            alive = {pid for pid, fd in fds.items() if fd is not None}
        if owner[0] not in alive:
            break
        if not alive & {identity[0] for identity in engine}:
            return  # the engine was shut down and its owner lives on: nothing left to guard
        if fds is None:
            time.sleep(0.5)
            continue
        for ready, _ in poller.poll():
            poller.unregister(ready)
            fds = {pid: None if fd == ready else fd for pid, fd in fds.items()}
    stopped = _stop_engine(engine, spec["companions"])
    if stopped:
        print(f"engine watchdog: pid {owner[0]} exited and left its engine running; "
              f"stopped its processes {stopped}", file=sys.stderr, flush=True)


def _stop_engine(engine: list, companions: list, grace: float = 2.0) -> list[int]:
    """Stop the engine's processes (and what they started since), then the resource tracker; their pids."""
    processes: dict[int, psutil.Process] = {}
    for identity in engine:
        process = _alive(identity)
        if process is None:
            continue
        processes[process.pid] = process
        try:
            processes.update({child.pid: child for child in process.children(recursive=True)})
        except psutil.Error:
            pass
    # SIGTERM first, so vLLM may release what it can; SIGKILL after `grace`: an orphaned engine core
    # was seen ignoring SIGTERM for 80 minutes.
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for process in processes.values():
            try:
                process.send_signal(signum)
            except psutil.Error:
                pass
        if not _wait_gone(list(processes.values()), wait):
            break
    # The resource tracker exits by itself once no process holds its pipe (it then unlinks the
    # shared memory the engine leaked); one that does not within a few seconds is killed.
    trackers = [process for process in map(_alive, companions) if process is not None]
    for process in _wait_gone(trackers, 5.0):
        try:
            process.kill()
        except psutil.Error:
            pass
    return sorted(processes) + [process.pid for process in trackers]


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until `processes` have exited; those still running after `timeout`.

    Not psutil.wait_procs: these are not the watchdog's children, and a zombie that its new parent
    (an init that does not reap, in some containers) leaves unreaped counts as gone here.
    """
    deadline = time.monotonic() + timeout
    while True:
        still = [process for process in processes if _running(process)]
        if not still or time.monotonic() >= deadline:
            return still
        time.sleep(0.1)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


if __name__ == "__main__":
    _watch(json.loads(sys.argv[1]))
