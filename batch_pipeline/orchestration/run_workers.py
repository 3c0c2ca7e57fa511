"""Runs whose worker process is gone: found and reported failed, so the run retry resumes them.

Dagster's default run launcher starts each run as a child process of a code server, and that code
server's cleanup thread reports a run failed when its process dies. The thread has no error
handling: a worker killed while the database is unreachable (PostgreSQL restarting) makes the thread
raise and end, and from then on nothing ever reports that run, or any later run of that code server.
Run monitoring cannot see it either (the default launcher has no worker health check). Such a run
stays STARTED for ever, its batch `in_progress` with nothing running it.

The `dead_run_workers` sensor closes that gap. Every run records its worker's pid (Dagster's "Started
process for run (pid: N)" engine event); a STARTED run whose worker has been gone for two ticks in a
row is reported failed here, and the run retry takes it from there (finished chunks are kept). Two
ticks, so the code server's own report, which normally comes within a second, goes first.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import psutil
from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

WORKER_EVENT_PREFIX = "Started process for run (pid: "


def worker_pid(instance: DagsterInstance, run: DagsterRun) -> tuple[int, float] | None:
    """The run worker's pid and when it reported itself, or None if it has not started yet."""
    for entry in instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT):
        event = entry.dagster_event
        if event is None or not (event.message or "").startswith(WORKER_EVENT_PREFIX):
            continue
        data = event.engine_event_data
        pid = data.metadata.get("pid") if data is not None and data.metadata else None
        if pid is not None and str(pid.value).isdigit():
            return int(str(pid.value)), entry.timestamp
    return None


def worker_alive(pid: int, reported_at: float) -> bool:
    """Whether the process is still that worker (a pid reused after it died is a different process)."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= reported_at + 1
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # not ours to see: assume alive rather than fail a live run


def dead_workers(instance: DagsterInstance) -> dict[str, int]:
    """Run id -> pid of every STARTED run whose worker process no longer exists."""
    dead = {}
    for run in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED])):
        worker = worker_pid(instance, run)
        if worker is not None and not worker_alive(*worker):
            dead[run.run_id] = worker[0]
    return dead


def report_dead(instance: DagsterInstance, suspects: Iterable[str]) -> tuple[list[str], list[str]]:
    """Report failed every run found dead now that was suspected on the tick before.

    Returns (reported run ids, suspects for the next tick).
    """
    earlier = set(suspects)
    reported, suspected = [], []
    for run_id, pid in dead_workers(instance).items():
        if run_id not in earlier:
            suspected.append(run_id)
            continue
        run = instance.get_run_by_id(run_id)
        if run is None or run.status != DagsterRunStatus.STARTED:
            continue  # reported meanwhile (by its code server)
        instance.report_engine_event(
            f"The run worker (pid {pid}) is gone and its code server did not report it; reported failed so that "
            "the run retry resumes the batch from its finished chunks.", run)
        instance.report_run_failed(run)
        reported.append(run_id)
    return reported, suspected


def load_cursor(cursor: str | None) -> list[str]:
    try:
        value = json.loads(cursor) if cursor else []
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []
