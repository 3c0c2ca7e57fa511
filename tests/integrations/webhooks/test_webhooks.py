"""Batch webhooks: OpenAI's events, verified by the official client; retries, dead letters, resend, restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from tests.support.files import REPO
from tests.support.waiting import wait_for


def add_run(instance, batch_id: str, status, tags: dict | None = None) -> None:
    """A batch_job run of the batch's partition, ended in `status` (what the daemon's runs leave)."""
    from dagster import DagsterRun

    instance.add_run(DagsterRun(job_name="batch_job", status=status,
                                tags={"dagster/partition": batch_id, "vllm_batch/batch_id": batch_id, **(tags or {})}))


def tick(settings, instance, cursor=None):
    from integrations.webhooks.sensors import webhook_tick

    return webhook_tick(instance, settings, cursor)


def test_completed_batch_sends_openai_event_to_every_endpoint_once(webhook_settings, sqlite_instance, finished_batch,
                                                                   receiver):
    from dagster import DagsterRunStatus, SensorResult, build_sensor_context
    from openai.types.webhooks import BatchCompletedWebhookEvent

    from batch_pipeline.orchestration.definitions import build_definitions

    finished_batch("done-1")
    add_run(sqlite_instance, "done-1", DagsterRunStatus.SUCCESS)
    # The sensor as the code location defines it when VBATCH_ENABLE_WEBHOOKS=true.
    sensor = build_definitions(webhook_settings).resolve_sensor_def("batch_webhooks")
    result = sensor(build_sensor_context(instance=sqlite_instance))
    assert isinstance(result, SensorResult)

    a, b = receiver.at("a"), receiver.at("b")
    assert len(a) == len(b) == 1
    for delivery in (a[0], b[0]):
        assert delivery.error is None
        assert isinstance(delivery.event, BatchCompletedWebhookEvent)
        assert delivery.event.data.id == "done-1" and delivery.event.object == "event"
        assert delivery.headers["webhook-id"] == delivery.event.id and delivery.event.id.startswith("evt_")
    body = json.loads(a[0].body)
    assert body["data"]["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    assert body["data"]["metadata"] == {"team": "search"}
    assert a[0].body == b[0].body
    assert {o.metadata["webhook_delivery"].value for o in result.asset_events} == {"delivered"}
    assert {o.partition for o in result.asset_events} == {"done-1"}

    pending = webhook_settings.resolved_data_dir / "webhooks" / "pending"
    assert pending.is_dir() and not list(pending.iterdir()), "a delivered event is no longer read by each tick"

    # Later ticks (and a tick with no cursor, as after a lost cursor) send nothing new.
    sensor(build_sensor_context(instance=sqlite_instance, cursor=result.cursor))
    tick(webhook_settings, sqlite_instance)
    assert len(receiver.deliveries) == 2


def test_failed_cancelled_and_expired_batches_send_their_events(webhook_settings, sqlite_instance, tmp_path,
                                                                finished_batch, receiver):
    from dagster import DagsterRunStatus
    from openai.types.webhooks import (
        BatchCancelledWebhookEvent,
        BatchExpiredWebhookEvent,
        BatchFailedWebhookEvent,
    )

    from batch_pipeline.domain.intake import register
    from batch_pipeline.domain.models import ServedModel
    from batch_pipeline.orchestration.definitions import build_definitions

    # failed: a real batch_job run, refused at intake.
    register(webhook_settings, sqlite_instance, Path("/nope.jsonl"), ServedModel("m", "m"), source="test",
             batch_id="bad-1", chunk_size=4, rejected="not a batch")
    job = build_definitions(webhook_settings).resolve_job_def("batch_job")
    assert not job.execute_in_process(instance=sqlite_instance, partition_key="bad-1", raise_on_error=False).success
    # a failed run that Dagster will retry is not terminal yet.
    finished_batch("retrying-1")
    add_run(sqlite_instance, "retrying-1", DagsterRunStatus.FAILURE, {"dagster/will_retry": "true"})
    # cancelled from the UI: the run was cancelled before it wrote any results.
    (finished_batch("ui-cancel-1") / "results" / "summary.json").unlink()
    add_run(sqlite_instance, "ui-cancel-1", DagsterRunStatus.CANCELED)
    # expired through the API: submission.json says so and stopped.json holds the partial counts.
    root = finished_batch("late-1")
    (root / "submission.json").write_text(json.dumps({"expires_at": 1.0, "expired_at": 2.0, "stopped_at": 3.0}))
    (root / "results" / "stopped.json").write_text(json.dumps(
        {"total": 10, "completed": 4, "failed": 6, "prompt_tokens": 0, "completion_tokens": 0, "reason": "expired"}))

    tick(webhook_settings, sqlite_instance)
    events = {d.event.data.id: d for d in receiver.at("a")}
    assert set(events) == {"bad-1", "ui-cancel-1", "late-1"}
    assert isinstance(events["bad-1"].event, BatchFailedWebhookEvent)
    assert isinstance(events["ui-cancel-1"].event, BatchCancelledWebhookEvent)
    assert isinstance(events["late-1"].event, BatchExpiredWebhookEvent)
    assert json.loads(events["late-1"].body)["data"]["request_counts"] == {"total": 10, "completed": 4, "failed": 6}


def test_receiver_failing_twice_gets_the_same_event_on_the_third_attempt(webhook_settings, sqlite_instance,
                                                                         finished_batch, receiver):
    from dagster import DagsterRunStatus

    from integrations.webhooks.deliveries import DeliveryLog

    receiver.fail_first["/a"] = 2
    finished_batch("flaky-1")
    add_run(sqlite_instance, "flaky-1", DagsterRunStatus.SUCCESS)
    state: dict = {"cursor": None}

    def third_attempt() -> bool:
        state["cursor"], _ = tick(webhook_settings, sqlite_instance, state["cursor"])
        return len(receiver.at("a")) >= 3

    wait_for(third_attempt, 20, "a third attempt at /a", interval=0.05)
    attempts = receiver.at("a")
    assert len(attempts) == 3 and len(receiver.at("b")) == 1
    assert len({d.headers["webhook-id"] for d in attempts}) == 1 and len({d.body for d in attempts}) == 1
    assert attempts[2].event is not None and attempts[2].event.data.id == "flaky-1"
    [record] = DeliveryLog(webhook_settings.resolved_data_dir).records()
    states = sorted((s["attempts"], bool(s["delivered_at"])) for s in record["deliveries"].values())
    assert states == [(1, True), (3, True)]


def test_wrong_secret_is_rejected_by_the_receiver_becomes_a_dead_letter_and_resends(
        webhook_settings, sqlite_instance, finished_batch, receiver, monkeypatch):
    from dagster import DagsterRunStatus

    from batch_pipeline.domain import settings as settings_module
    from integrations.webhooks.cli import webhooks

    wrong = webhook_settings.model_copy(update={"webhook_url": [f"{receiver.url}/a"],
                                                "webhook_secret": SecretStr("whsec_" + "A" * 40)})
    finished_batch("secret-1")
    add_run(sqlite_instance, "secret-1", DagsterRunStatus.SUCCESS)
    _, observations = tick(wrong, sqlite_instance)
    [attempt] = receiver.at("a")
    assert attempt.event is None and "InvalidWebhookSignatureError" in attempt.error
    [observation] = observations
    assert observation.metadata["webhook_delivery"].value == "dead letter"
    tick(wrong, sqlite_instance)
    assert len(receiver.at("a")) == 1, "a 4xx answer is not retried"

    right = wrong.model_copy(update={"webhook_secret": webhook_settings.webhook_secret})
    monkeypatch.setattr(settings_module, "get_settings", lambda: right)
    listed = CliRunner().invoke(webhooks, ["list", "--dead"])
    assert listed.exit_code == 0 and "secret-1" in listed.output and "dead after 1 attempt" in listed.output
    assert SecretStr.__name__ not in listed.output and "AAAA" not in listed.output
    resent = CliRunner().invoke(webhooks, ["resend", "--all-dead"])
    assert resent.exit_code == 0, resent.output
    first, second = receiver.at("a")
    assert second.event is not None and second.headers["webhook-id"] == first.headers["webhook-id"]
    assert CliRunner().invoke(webhooks, ["list", "--dead"]).output == ""


def test_a_hanging_receiver_does_not_hold_up_another(webhook_settings, sqlite_instance, finished_batch, receiver):
    from dagster import DagsterRunStatus

    release = threading.Event()
    receiver.hold["/a"] = release  # /a answers only when the test says so
    finished_batch("slow-1")
    add_run(sqlite_instance, "slow-1", DagsterRunStatus.SUCCESS)
    try:
        _, observations = tick(webhook_settings.model_copy(update={"webhook_timeout_seconds": 2.0}), sqlite_instance)
        # The tick came back while /a still held its answer: it gave up at its timeout instead of waiting.
        [hanging] = receiver.at("a")
        assert not hanging.answered
    finally:
        release.set()
    [fast] = receiver.at("b")
    assert fast.event is not None  # delivered in the same tick as the hanging one
    assert [o.metadata["webhook_delivery"].value for o in observations] == ["delivered"]
    from integrations.webhooks.deliveries import DeliveryLog

    [record] = DeliveryLog(webhook_settings.resolved_data_dir).records()
    timed_out = [s for s in record["deliveries"].values() if not s["delivered_at"]]
    assert len(timed_out) == 1 and "Timeout" in timed_out[0]["last_error"] and timed_out[0]["dead_at"] is None


TICK_LOOP = """
import sys, time
from dagster import DagsterInstance
from batch_pipeline.domain.settings import Settings
from integrations.webhooks.sensors import webhook_tick
settings = Settings.model_validate_json(sys.argv[1])
cursor = None
with DagsterInstance.from_ref(DagsterInstance.local_temp(sys.argv[2]).get_ref()) as instance:
    while True:
        cursor, _ = webhook_tick(instance, settings, cursor)
        print("tick", flush=True)
        time.sleep(0.1)
"""


def test_a_killed_sender_resends_the_same_event_after_restart(webhook_settings, sqlite_instance, finished_batch,
                                                              receiver, tmp_path):
    """A process running the sensor's ticks is SIGKILLed between attempts; the next one re-sends the same id."""
    from dagster import DagsterRunStatus

    from integrations.webhooks.deliveries import DeliveryLog

    receiver.fail_first["/a"] = 1
    settings = webhook_settings.model_copy(update={"webhook_url": [f"{receiver.url}/a"],
                                                   "webhook_backoff_seconds": 1.0})
    finished_batch("kill-1")
    add_run(sqlite_instance, "kill-1", DagsterRunStatus.SUCCESS)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    dump = settings.model_dump_json().replace('"**********"', json.dumps(settings.webhook_secret.get_secret_value()))

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", TICK_LOOP, dump, str(tmp_path / "dagster")], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, text=True)

    def delivery_states() -> list[dict]:
        return [s for r in DeliveryLog(settings.resolved_data_dir).records() for s in r["deliveries"].values()]

    sender = start()
    wait_for(lambda: any(s["attempts"] == 1 and s["last_error"] for s in delivery_states()), 60,
             "the failed first attempt in the delivery log", interval=0.05, watch=[sender])
    os.kill(sender.pid, signal.SIGKILL)
    sender.wait()
    assert len(receiver.at("a")) == 1

    sender = start()
    try:
        wait_for(lambda: any(s["delivered_at"] for s in delivery_states()), 60, "the delivery after the restart",
                 interval=0.05, watch=[sender])
        for _ in range(3):  # three more ticks after the delivery was recorded
            assert sender.stdout.readline(), "the sender exited"
    finally:
        sender.kill()
        sender.wait()
    first, second = receiver.at("a")
    assert second.event is not None
    assert second.headers["webhook-id"] == first.headers["webhook-id"] and second.body == first.body


def test_backoff_doubles_up_to_an_hour(settings):
    from integrations.webhooks.deliveries import next_delay

    quick = settings.model_copy(update={"webhook_backoff_seconds": 5.0})
    assert [next_delay(quick, n) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert next_delay(quick, 30) == 3600.0


def test_a_secret_per_endpoint_and_bad_pairings(settings):
    from integrations.webhooks.deliveries import endpoints_from

    two = settings.model_copy(update={"webhook_url": ["http://x/1", "http://y/2"], "webhook_secret": SecretStr("s1,s2")})
    assert [e.secret for e in endpoints_from(two)] == ["s1", "s2"]
    assert [e.label for e in endpoints_from(two)] == ["http://x/…", "http://y/…"]
    with pytest.raises(ValueError, match="one secret for every endpoint"):
        endpoints_from(two.model_copy(update={"webhook_secret": SecretStr("a,b,c")}))
    with pytest.raises(ValueError, match="required"):
        endpoints_from(two.model_copy(update={"webhook_secret": None}))


def test_webhooks_alone_add_a_sensor_and_no_integrations_job(webhook_settings):
    """With only sensors enabled there is no asset to run after a batch (an empty job cannot run)."""
    from batch_pipeline.orchestration.definitions import build_definitions

    repository = build_definitions(webhook_settings).get_repository_def()
    assert repository.has_sensor_def("batch_webhooks")
    assert not repository.has_job("batch_integrations")


def test_webhooks_without_an_endpoint_or_secret_are_one_line(settings):
    from batch_pipeline.orchestration.definitions import build_definitions
    from batch_pipeline.orchestration.enabled_integrations import IntegrationError, check_integrations

    with pytest.raises(IntegrationError, match="webhooks integration is not configured: set VBATCH_WEBHOOK_URL"):
        check_integrations(settings.model_copy(update={"enable_webhooks": True}))
    with pytest.raises(IntegrationError, match="VBATCH_WEBHOOK_SECRET is required"):
        build_definitions(settings.model_copy(update={"enable_webhooks": True, "webhook_url": ["http://x/"]}))
