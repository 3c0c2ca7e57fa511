"""Sensors: the daemon-side ways in."""

from __future__ import annotations

from dagster import DefaultSensorStatus, RunRequest, RunsFilter, SensorEvaluationContext, SensorResult, sensor

from batch_pipeline.settings import get_settings
from batch_pipeline.submission import clear_ticket, pending_tickets

QUEUE_SENSOR_INTERVAL_S = 5


@sensor(
    job_name="batch_job",
    minimum_interval_seconds=QUEUE_SENSOR_INTERVAL_S,
    default_status=DefaultSensorStatus.RUNNING,
    description="Launches a run for every batch queued by the API, `vllm-batch submit` or the inbox sensor.",
)
def queued_batches(context: SensorEvaluationContext) -> SensorResult:
    """One RunRequest per queue ticket; the ticket id is the run key, so each ticket runs once."""
    data_dir = get_settings().resolved_data_dir
    requests = []
    for ticket in pending_tickets(data_dir):
        runs = context.instance.get_run_records(
            RunsFilter(tags={"dagster/run_key": ticket["ticket"]}), limit=1)
        if runs:
            clear_ticket(data_dir, ticket["ticket"])  # launched on an earlier tick
            continue
        requests.append(RunRequest(
            run_key=ticket["ticket"],
            partition_key=ticket["batch_id"],
            tags={"vllm_batch/batch_id": ticket["batch_id"], **ticket.get("tags", {})},
        ))
    return SensorResult(run_requests=requests)
