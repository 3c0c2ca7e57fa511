"""`vllm-batch start`: the Dagster webserver and daemon on the configured instance, kept running.

It does what two systemd units do (docs/OPERATIONS.md): install dagster.yaml into DAGSTER_HOME,
start `dagster-webserver` and `dagster-daemon run` on workspace.yaml, and restart either one if it
dies (the daemon's sensors, schedules, queue and run retries stop while it is down). Ctrl-C or
SIGTERM stops both, with their code servers and any run in flight: a run stopped that way is
retried when the service comes back (run retries), resuming from its finished chunks.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from batch_pipeline.domain.instance import prepare_instance
from batch_pipeline.domain.log_format import relay_json_lines
from batch_pipeline.domain.settings import Settings
from batch_pipeline.orchestration.enabled_integrations import start_integration_services

_MAX_BACKOFF_S = 30.0


@dataclass
class _Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)
    groups: list[int] = field(default_factory=list)


def _bin(name: str) -> str:
    # The console scripts installed beside this interpreter (the venv), else whatever is on PATH.
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def service_commands(settings: Settings, host: str, port: int) -> dict[str, list[str]]:
    """The webserver and daemon command lines."""
    workspace = str(settings.home / "workspace.yaml")
    # Dagster's own JSON lines (the daemon passes the format on to its code servers); relayed and normalised below.
    log_format = ["--log-format", "json"] if settings.log_format == "json" else []
    return {
        "webserver": [_bin("dagster-webserver"), "-w", workspace, "-h", host, "-p", str(port), *log_format],
        "daemon": [_bin("dagster-daemon"), "run", "-w", workspace, *log_format],
    }


def _stop(child: _Child, grace_s: float = 20.0) -> None:
    if child.process is None or child.process.poll() is not None:
        return
    try:
        os.killpg(child.process.pid, signal.SIGTERM)
        child.process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.process.pid, signal.SIGKILL)
        child.process.wait()
    except ProcessLookupError:
        pass


class AlreadyRunning(Exception):
    """Another `vllm-batch start` supervises this instance; one readable line."""


def _hold_instance_lock(home: Path) -> IO[str]:
    """An exclusive lock on DAGSTER_HOME for this process's lifetime: one supervisor (one daemon) per instance.

    The kernel drops the lock when the process dies, however it dies, so a killed supervisor never
    leaves a stale lock behind.
    """
    handle = (home / "vllm-batch-start.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise AlreadyRunning(f"vllm-batch start is already running on this instance ({home}, pid {holder}); "
                             "stop it first, or point this one at another DAGSTER_HOME") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _die_with_parent() -> None:
    # In the child before exec: the kernel sends it SIGTERM when the supervisor dies, even by SIGKILL,
    # so no daemon is left running (and launching runs) without its supervisor.
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def run_service(settings: Settings, host: str, port: int, echo=print) -> int:
    """Start both processes and supervise them until SIGTERM/SIGINT; returns the exit status."""
    home = prepare_instance(settings)
    lock = _hold_instance_lock(home)
    from resources.engine_host_client import stop_hosts

    engines = settings.resolved_data_dir / "engines"
    # A warm engine host outlives run workers by design; one left by a supervisor that was killed
    # would hold the GPU with nobody to own it, so a new service starts without it.
    if stop_hosts(engines):
        echo("stopped an engine host left behind by an earlier service")
    # What the service launches (its runs, through the daemon) knows it: a warm engine host one of them
    # starts ends with this process, even when this process is killed with SIGKILL.
    os.environ["VBATCH_SERVICE_PID"] = str(os.getpid())
    # Before the children start: they inherit what these set up (e.g. where vLLM writes its metrics).
    stop_services = start_integration_services(settings, echo)
    children = [_Child(name, argv) for name, argv in service_commands(settings, host, port).items()]
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def start(child: _Child) -> None:
        # Each in its own process group, so stopping it also stops its code server and run workers.
        # With JSON logs, what the child and everything under it prints (run workers, vLLM, tracebacks) comes
        # through a pipe and leaves as JSON lines on stderr.
        relay = settings.log_format == "json"
        child.process = subprocess.Popen(child.argv, cwd=settings.home, start_new_session=True,
                                         preexec_fn=_die_with_parent, stdout=subprocess.PIPE if relay else None,
                                         stderr=subprocess.STDOUT if relay else None)
        if relay:
            threading.Thread(target=relay_json_lines, args=(child.process.stdout, child.name, sys.stderr),
                             name=f"{child.name}-log-relay", daemon=True).start()
        child.started_at = time.monotonic()
        child.groups.append(child.process.pid)
        echo(f"{child.name} started (pid {child.process.pid})")

    echo(f"instance: {home} ({'PostgreSQL' if settings.postgres_url else 'SQLite'} storage)")
    for child in children:
        start(child)
    echo(f"Dagster UI: http://{host}:{port}")
    try:
        while not stopping:
            time.sleep(0.5)
            for child in children:
                code = child.process.poll() if child.process else None
                if code is None or stopping:
                    continue
                # A child that ran for a while gets restarted at once; one that keeps dying backs off.
                quick = time.monotonic() - child.started_at < 60
                child.restarts = child.restarts + 1 if quick else 0
                delay = min(_MAX_BACKOFF_S, 2.0 ** child.restarts) if quick else 1.0
                echo(f"{child.name} exited with {code}; restarting in {delay:.0f}s")
                time.sleep(delay)
                if not stopping:
                    start(child)
    finally:
        for child in reversed(children):
            _stop(child)
            for group in child.groups:  # what earlier, dead incarnations left (code servers, runs)
                try:
                    os.killpg(group, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for stop in stop_services:
            stop()
        stop_hosts(engines)  # the service's warm engines go with it
        lock.close()
    echo("stopped")
    return 0
