"""Sensors: the daemon-side ways in."""

from __future__ import annotations

import json

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from batch_pipeline.domain.batches import load_submission, save_submission
from batch_pipeline.domain.constants import BATCH_ID_TAG, BATCHES_PARTITIONS, INBOX_FILE_TAG, REJECTED_TAG, RUN_KEY_TAG, SOURCE_TAG
from batch_pipeline.domain.estimate import Estimator
from batch_pipeline.domain.inbox import list_inbox, settle, take
from batch_pipeline.domain.queue_tickets import clear_ticket, pending_tickets, set_aside
from batch_pipeline.domain.settings import Settings, get_settings
from batch_pipeline.domain.stopping import enforce_stops
from batch_pipeline.orchestration.run_workers import load_cursor, report_dead
from resources.storage import BatchStorage, location

QUEUE_SENSOR_INTERVAL_S = 5
STOPS_SENSOR_INTERVAL_S = 10
WORKER_WATCH_INTERVAL_S = 15


@sensor(
    job_name="batch_job",
    minimum_interval_seconds=QUEUE_SENSOR_INTERVAL_S,
    default_status=DefaultSensorStatus.RUNNING,
    description="Launches a run for every batch queued by the API, `vllm-batch submit` or the inbox sensor.",
)
def queued_batches(context: SensorEvaluationContext) -> SensorResult:
    """One RunRequest per queue ticket; the ticket id is the run key, so each ticket runs once."""
    data_dir = location(get_settings().data_root)
    storage = BatchStorage(data_dir=get_settings().data_root)
    requests = []
    tickets = pending_tickets(data_dir)
    # One query for the runs of every ticket (the API may leave dozens between two ticks).
    keys = [ticket["ticket"] for ticket in tickets]
    launched = {run.tags.get(RUN_KEY_TAG) for run in context.instance.get_runs(RunsFilter(tags={RUN_KEY_TAG: keys}))
                } if keys else set()
    for ticket in tickets:
        if ticket["ticket"] in launched:
            clear_ticket(data_dir, ticket["ticket"])  # launched on an earlier tick
            continue
        batch_id = ticket.get("batch_id", "")
        if not context.instance.has_dynamic_partition(BATCHES_PARTITIONS, batch_id):
            # Its partition was deleted (in the UI) or the instance reset while data/ was kept. Dagster
            # would fail the whole tick on it, and with it every ticket behind: set it aside instead.
            reason = (f"batch {batch_id} could not be launched: its partition no longer exists on this Dagster "
                      "instance (deleted in the UI, or the instance was reset); submit it again")
            set_aside(data_dir, ticket["ticket"], reason)
            paths = storage.batch(batch_id)
            submission = load_submission(paths) if batch_id and paths.spec.exists() else None
            if submission is not None:
                save_submission(paths, submission.model_copy(update={"launch_error": reason}))
            context.log.warning(reason)
            continue
        requests.append(RunRequest(
            run_key=ticket["ticket"],
            partition_key=ticket["batch_id"],
            tags={BATCH_ID_TAG: ticket["batch_id"], **ticket.get("tags", {})},
        ))
    return SensorResult(run_requests=requests)


@sensor(
    minimum_interval_seconds=STOPS_SENSOR_INTERVAL_S,
    default_status=DefaultSensorStatus.RUNNING,
    description="Carries out cancel requests and closed completion windows: stops the run, writes partial results.",
)
def batch_stops(context: SensorEvaluationContext) -> SkipReason:
    """Enforce every due stop (batch_pipeline/domain/stopping.py); launches nothing itself."""
    acted = enforce_stops(context.instance, location(get_settings().data_root))
    return SkipReason(f"stopped or settled: {', '.join(acted)}" if acted else "no stop due")


@sensor(
    minimum_interval_seconds=WORKER_WATCH_INTERVAL_S,
    default_status=DefaultSensorStatus.RUNNING,
    description="Reports failed the runs whose worker process is gone unreported (killed while the database "
                "was down), so the run retry resumes their batches.",
)
def dead_run_workers(context: SensorEvaluationContext) -> SkipReason:
    """Two ticks in a row with a STARTED run's worker gone: report the run failed (batch_pipeline/orchestration/run_workers.py)."""
    reported, suspected = report_dead(context.instance, load_cursor(context.cursor))
    context.update_cursor(json.dumps(suspected))
    for run_id in reported:
        context.log.warning(f"run {run_id}: its worker was gone and unreported; reported failed for the run retry")
    return SkipReason(f"reported failed: {', '.join(reported)}" if reported else
                      f"{len(suspected)} run(s) with a worker gone, checked again next tick" if suspected else
                      "every started run has its worker")


def build_inbox_sensor(settings: Settings) -> SensorDefinition:
    """The sensor on the inbox folder (batch_pipeline/domain/inbox.py describes the convention)."""

    @sensor(
        name="inbox",
        job_name="batch_job",
        minimum_interval_seconds=settings.inbox_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING if settings.inbox_enabled else DefaultSensorStatus.STOPPED,
        description=f"Turns each complete *.jsonl file in {settings.resolved_inbox_dir} into a batch and a run.",
    )
    def inbox(context: SensorEvaluationContext) -> SensorResult:
        """A file whose size and mtime did not change since the last tick is taken; run key `inbox:<batch id>`."""
        current = get_settings()
        storage = BatchStorage(data_dir=current.data_root)
        seen = json.loads(context.cursor).get("seen", {}) if context.cursor else {}
        now_seen: dict[str, list[int]] = {}
        requests = []
        for file in list_inbox(current.resolved_inbox_dir):
            now_seen[file.path.name] = file.signature
            if seen.get(file.path.name) != file.signature:
                continue  # new or still growing: look again next tick
            try:
                intake = take(file, current, context.instance)
            except (OSError, ValueError) as exc:
                context.log.error(f"{file.path.name}: could not be taken: {exc}")
                continue
            if context.instance.get_run_ids(RunsFilter(tags={RUN_KEY_TAG: intake.run_key}), limit=1):
                settle(intake.source)  # its run exists (launched on an earlier tick): done with the file
                now_seen.pop(file.path.name)
                continue
            if intake.spec.rejected:
                context.log.warning(
                    f"{file.path.name}: rejected as batch {intake.spec.batch_id}: {intake.spec.rejected}")
            else:
                context.log.info(f"{file.path.name}: batch {intake.spec.batch_id} for model {intake.spec.model_name}")
                if not storage.batch(intake.spec.batch_id).estimate.exists():  # taken again until its run exists
                    Estimator(current, context.instance).at_creation(intake.spec, intake.destination)
            requests.append(RunRequest(
                run_key=intake.run_key,
                partition_key=intake.spec.batch_id,
                tags={BATCH_ID_TAG: intake.spec.batch_id, SOURCE_TAG: "inbox", INBOX_FILE_TAG: file.path.name,
                      **({REJECTED_TAG: "true"} if intake.spec.rejected else {})},
            ))
        return SensorResult(run_requests=requests, cursor=json.dumps({"seen": now_seen}))

    return inbox
