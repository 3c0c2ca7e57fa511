"""`vllm-batch start`: the Dagster webserver and daemon on the configured instance, kept running.

It does what two systemd units do (docs/OPERATIONS.md): install dagster.yaml into DAGSTER_HOME,
start `dagster-webserver` and `dagster-daemon run` on workspace.yaml, and restart either one if it
dies (the daemon's sensors, schedules, queue and run retries stop while it is down). Ctrl-C or
SIGTERM stops both, with their code servers and any run in flight: a run stopped that way is
retried when the service comes back (run retries), resuming from its finished chunks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from batch_pipeline.enabled_integrations import start_integration_services
from batch_pipeline.instance import prepare_instance
from batch_pipeline.settings import Settings

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
    return {
        "webserver": [_bin("dagster-webserver"), "-w", workspace, "-h", host, "-p", str(port)],
        "daemon": [_bin("dagster-daemon"), "run", "-w", workspace],
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


def run_service(settings: Settings, host: str, port: int, echo=print) -> int:
    """Start both processes and supervise them until SIGTERM/SIGINT; returns the exit status."""
    home = prepare_instance(settings)
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
        child.process = subprocess.Popen(child.argv, cwd=settings.home, start_new_session=True)
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
    echo("stopped")
    return 0
