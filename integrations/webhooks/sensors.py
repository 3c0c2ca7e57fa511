"""The webhook sensor: finds batches that reached a terminal state, logs their event once, delivers what is due.

It runs in the daemon, so every way a batch runs (CLI, submit, API, inbox, UI, schedule) is covered as long
as the daemon watches the instance. Each tick: batch_job runs that ended since the cursor, plus batches
whose stopped.json or submission.json changed (cancel and expiry through the API), are checked for a
terminal state; a new (batch, event type) is logged with its one event id; then every due delivery is
attempted. Deliveries and dead letters show on the batch's `batch_results` partition as observations.
"""

import json
import os
import time
from datetime import datetime, timezone

from dagster import (
    AssetObservation,
    DefaultSensorStatus,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from batch_pipeline.domain.settings import Settings
from batch_pipeline.orchestration.enabled_integrations import IntegrationError
from integrations.webhooks.deliveries import DeliveryLog, deliver_due, endpoints_from
from integrations.webhooks.events import (
    BATCH_JOB,
    PARTITION_TAG,
    TERMINAL_RUN_STATUSES,
    batch_event,
    batch_outcome,
    event_id,
)
from resources.storage import BatchStorage

# The first tick looks back this far; later ticks from the cursor, with an overlap for late-written records.
FIRST_LOOKBACK_SECONDS = 3600.0
OVERLAP_SECONDS = 60.0


def changed_batches(instance, storage: BatchStorage, since: float) -> set[str]:
    """Batches whose run ended, or whose stop files changed, after `since` (epoch seconds)."""
    ids: set[str] = set()
    records = instance.get_run_records(RunsFilter(job_name=BATCH_JOB, statuses=TERMINAL_RUN_STATUSES,
                                                  updated_after=datetime.fromtimestamp(since, timezone.utc)))
    ids.update(r.dagster_run.tags[PARTITION_TAG] for r in records if PARTITION_TAG in r.dagster_run.tags)
    root = os.path.join(storage.data_dir, "batches")
    if os.path.isdir(root):
        for entry in os.scandir(root):
            for name in ("results/stopped.json", "submission.json"):
                try:
                    if os.stat(os.path.join(entry.path, name)).st_mtime >= since:
                        ids.add(entry.name)
                except OSError:
                    continue
    return ids


def webhook_tick(instance, settings: Settings, cursor: str | None, log=None) -> tuple[str, list[AssetObservation]]:
    """One pass: log new events, attempt due deliveries. Returns the new cursor and observations to record."""
    now = time.time()
    since = json.loads(cursor)["since"] - OVERLAP_SECONDS if cursor else now - FIRST_LOOKBACK_SECONDS
    storage = BatchStorage(data_dir=str(settings.resolved_data_dir))
    endpoints = endpoints_from(settings)
    observations = []
    with DeliveryLog(settings.resolved_data_dir).locked() as deliveries:
        for batch_id in sorted(changed_batches(instance, storage, since)):
            paths = storage.batch(batch_id)
            outcome = batch_outcome(instance, paths)
            if outcome is None or deliveries.has(event_id(paths, outcome.type)):
                continue
            event = batch_event(paths, outcome)
            deliveries.record(event, endpoints, now)
            if log:
                log.info(f"{event['type']} for batch {batch_id}: event {event['id']}")
        for event, attempt, state in deliver_due(deliveries, endpoints, settings):
            delivery = "delivered" if state["delivered_at"] else "dead letter" if state["dead_at"] else "will retry"
            if log:
                log.info(f"{event['type']} {event['id']} -> {attempt.endpoint.label}: {delivery}"
                         + (f" ({attempt.error})" if attempt.error else ""))
            if delivery != "will retry":
                observations.append(AssetObservation(
                    asset_key="batch_results", partition=event["data"]["id"],
                    metadata={"webhook_event": event["type"], "webhook_event_id": event["id"],
                              "webhook_endpoint": attempt.endpoint.label, "webhook_delivery": delivery,
                              "webhook_attempts": state["attempts"], "webhook_last_error": attempt.error or ""}))
    return json.dumps({"since": now}), observations


def check_webhook_settings(settings: Settings) -> None:
    """Endpoints and secrets pair up (checked at start-up and when the code location loads, not at a tick)."""
    try:
        if not endpoints_from(settings):
            raise ValueError("set VBATCH_WEBHOOK_URL (and VBATCH_WEBHOOK_SECRET)")
    except ValueError as exc:
        raise IntegrationError(f"the webhooks integration is not configured: {exc}") from None


def build_webhook_sensor(settings: Settings) -> SensorDefinition:
    """The `batch_webhooks` sensor for these settings (running by default)."""
    check_webhook_settings(settings)

    @sensor(name="batch_webhooks", minimum_interval_seconds=settings.webhook_interval_seconds,
            default_status=DefaultSensorStatus.RUNNING,
            description="Sends OpenAI-style batch.completed/failed/cancelled/expired webhooks, with retries.")
    def batch_webhooks(context: SensorEvaluationContext) -> SensorResult:
        cursor, observations = webhook_tick(context.instance, settings, context.cursor, context.log)
        return SensorResult(cursor=cursor, asset_events=observations)

    return batch_webhooks
