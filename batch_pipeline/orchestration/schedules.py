"""The catch-up schedule: on a cron, launch a run for every batch whose results are not materialised yet.

It picks up batches registered without a run (e.g. `vllm-batch submit` while the daemon was down and
its ticket was lost), batches whose run was cancelled, and batches whose run failed for good. It
skips batches with a queue ticket not yet launched, a run in flight or a retry pending, and batches
the inbox rejected (they would only fail again). Off by default (VBATCH_SCHEDULE_ENABLED); the cron is VBATCH_SCHEDULE_CRON.
"""

from __future__ import annotations

from pathlib import Path

from dagster import (
    AssetKey,
    DefaultScheduleStatus,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from batch_pipeline.domain.batches import batches_partitions, load_spec, load_submission
from batch_pipeline.domain.constants import ACTIVE_RUN_STATUSES, BATCH_ID_TAG, PARTITION_TAG, SOURCE_TAG, WILL_RETRY_TAG
from batch_pipeline.domain.queue_tickets import pending_tickets
from batch_pipeline.domain.settings import Settings, get_settings
from resources.storage import BatchStorage


def batches_to_catch_up(instance, data_dir: str) -> list[str]:
    """Registered batches without materialised results, no run in flight, no retry pending, not rejected."""
    done = instance.get_materialized_partitions(AssetKey("batch_results"))
    ticketed = {ticket["batch_id"] for ticket in pending_tickets(Path(data_dir))}  # queued_batches launches them
    storage = BatchStorage(data_dir=data_dir)
    todo = []
    for batch_id in instance.get_dynamic_partitions(batches_partitions.name):
        if batch_id in done or batch_id in ticketed:
            continue
        paths = storage.batch(batch_id)
        if not paths.spec.exists() or load_spec(paths).rejected:
            continue
        submission = load_submission(paths)
        if submission is not None and (submission.cancel_requested_at or submission.expired_at):
            continue  # stopped on purpose: running it again would undo the cancel or the expiry
        partition = {PARTITION_TAG: batch_id}
        if instance.get_run_records(RunsFilter(tags=partition, statuses=list(ACTIVE_RUN_STATUSES)), limit=1):
            continue
        latest = instance.get_run_records(RunsFilter(tags=partition), limit=1)
        if latest and latest[0].dagster_run.tags.get(WILL_RETRY_TAG) == "true":
            continue  # the run-retry daemon is about to launch it
        todo.append(batch_id)
    return todo


def build_catch_up_schedule(settings: Settings) -> ScheduleDefinition:
    """The schedule, with the cron and default status from the settings."""

    @schedule(
        name="unmaterialised_batches",
        job_name="batch_job",
        cron_schedule=settings.schedule_cron,
        default_status=DefaultScheduleStatus.RUNNING if settings.schedule_enabled else DefaultScheduleStatus.STOPPED,
        description="Launches a run for every batch whose results are not materialised and that has no run in flight.",
    )
    def unmaterialised_batches(context: ScheduleEvaluationContext):
        """One RunRequest per batch to catch up; the run key carries the tick time, so a tick runs once."""
        todo = batches_to_catch_up(context.instance, get_settings().data_root)
        if not todo:
            return SkipReason("every batch is materialised or has a run in flight")
        tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
        return [RunRequest(run_key=f"{batch_id}@{tick}", partition_key=batch_id,
                           tags={BATCH_ID_TAG: batch_id, SOURCE_TAG: "schedule"})
                for batch_id in todo]

    return unmaterialised_batches
