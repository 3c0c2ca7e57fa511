"""The `dead_run_workers` watch (batch_pipeline/orchestration/run_workers.py) on a real instance and real processes.

The end-to-end case (a worker SIGKILLed while PostgreSQL is down, then retried) is in
tests/test_operations.py; here the watch itself: which runs it reports, and when.
"""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest
from dagster import DagsterEventType, DagsterRun, DagsterRunStatus, instance_for_test
from dagster._core.events import EngineEventData

from batch_pipeline.orchestration.run_workers import dead_workers, load_cursor, report_dead, worker_alive


@pytest.fixture
def instance(tmp_path):
    with instance_for_test(temp_dir=str(tmp_path)) as instance:
        yield instance


def started_run(instance, pid: int | None) -> DagsterRun:
    """A STARTED run whose worker reported itself with `pid`, as Dagster's code server records it."""
    run = instance.add_run(DagsterRun(job_name="batch_job", status=DagsterRunStatus.STARTED))
    if pid is not None:
        instance.report_engine_event(f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid))
    return run


def exited_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_run_whose_worker_is_gone_is_reported_failed_on_the_second_tick_only(instance):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = started_run(instance, exited_pid())
        alive = started_run(instance, live.pid)
        not_yet = started_run(instance, None)  # launched, its worker not started yet

        assert set(dead_workers(instance)) == {gone.run_id}
        reported, suspects = report_dead(instance, [])  # first tick: only suspected
        assert reported == [] and suspects == [gone.run_id]
        assert instance.get_run_by_id(gone.run_id).status == DagsterRunStatus.STARTED

        reported, suspects = report_dead(instance, suspects)  # second tick: reported
        assert reported == [gone.run_id] and suspects == []
        assert instance.get_run_by_id(gone.run_id).status == DagsterRunStatus.FAILURE
        failures = instance.all_logs(gone.run_id, of_type=DagsterEventType.RUN_FAILURE)
        assert len(failures) == 1
        messages = [e.dagster_event.message or "" for e in instance.all_logs(gone.run_id, of_type=DagsterEventType.ENGINE_EVENT)]
        assert any("is gone and its code server did not report it" in m for m in messages)
        for run in (alive, not_yet):
            assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED

        assert report_dead(instance, suspects) == ([], [])  # nothing left to report, nothing reported twice
    finally:
        live.kill()
        live.wait()


def test_a_run_reported_by_its_code_server_in_between_is_not_reported_again(instance):
    gone = started_run(instance, exited_pid())
    _, suspects = report_dead(instance, [])
    instance.report_run_failed(instance.get_run_by_id(gone.run_id))  # the code server's own report
    assert report_dead(instance, suspects) == ([], [])
    assert len(instance.all_logs(gone.run_id, of_type=DagsterEventType.RUN_FAILURE)) == 1


def test_a_reused_pid_is_not_the_worker():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        created = psutil.Process(process.pid).create_time()
        assert worker_alive(process.pid, reported_at=created + 5)  # reported after it started: the worker
        assert not worker_alive(process.pid, reported_at=created - 60)  # started after the report: a reused pid
    finally:
        process.kill()
        process.wait()
    assert not worker_alive(process.pid, reported_at=created + 5)


def test_the_cursor_survives_garbage():
    assert load_cursor(None) == [] and load_cursor("not json") == [] and load_cursor('{"a": 1}') == []
    assert load_cursor('["r1", "r2"]') == ["r1", "r2"]


def test_a_failed_run_not_yet_tagged_by_the_run_retry_reads_as_still_running(tmp_path):
    """Dagster tags a failed run `dagster/will_retry` a moment after storing the failure: in between, the
    batch is not failed (the soak saw `failed` for one poll, then `in_progress` again)."""
    import time

    from batch_pipeline.domain.status import UNTAGGED_FAILURE_GRACE_S, may_retry

    overrides = {"run_retries": {"enabled": True, "max_retries": 3}}
    for name in ("retries", "no-retries"):
        (tmp_path / name).mkdir()
    with instance_for_test(overrides=overrides, temp_dir=str(tmp_path / "retries")) as instance:
        failed = instance.add_run(DagsterRun(job_name="batch_job", status=DagsterRunStatus.FAILURE))
        now = time.time()
        assert may_retry(instance, failed, ended_at=now)  # no tag yet: may still be retried
        assert not may_retry(instance, failed, ended_at=now - UNTAGGED_FAILURE_GRACE_S - 1)  # never tagged
        assert not may_retry(instance, failed, ended_at=None)
        tagged = failed.with_tags({**failed.tags, "dagster/will_retry": "false"})
        assert not may_retry(instance, tagged, ended_at=now)
        assert may_retry(instance, failed.with_tags({"dagster/will_retry": "true"}), ended_at=now - 10_000)
    with instance_for_test(temp_dir=str(tmp_path / "no-retries")) as instance:
        failed = instance.add_run(DagsterRun(job_name="batch_job", status=DagsterRunStatus.FAILURE))
        assert not may_retry(instance, failed, ended_at=time.time())  # no run retries: final at once
