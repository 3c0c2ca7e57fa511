"""Which terminal state a batch is in, and the OpenAI webhook event that announces it.

The status is derived here from the run and the batch's files (the latest `batch_job` run of the partition,
results/summary.json, results/stopped.json, submission.json), the same facts the Batch API reads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from batch_pipeline.batches import load_spec
from resources.storage import BatchPaths

EVENT_TYPES = ("batch.completed", "batch.failed", "batch.cancelled", "batch.expired")
BATCH_JOB = "batch_job"
PARTITION_TAG = "dagster/partition"
WILL_RETRY_TAG = "dagster/will_retry"
TERMINAL_RUN_STATUSES = [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]


@dataclass(frozen=True)
class BatchOutcome:
    """A batch in a terminal state: the event type and when it got there (epoch seconds)."""

    batch_id: str
    type: str
    at: float


def _json(path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def batch_outcome(instance: DagsterInstance, paths: BatchPaths) -> BatchOutcome | None:
    """The batch's terminal state, or None while it is queued, running, cancelling or about to be retried."""
    batch_id = paths.root.name
    submission = _json(paths.root / "submission.json") or {}
    stopped_file = paths.results_dir / "stopped.json"
    stopped = _json(stopped_file)
    if stopped is not None:
        # Partial results written for a cancelled or expired batch (the API, or the UI's cancel).
        kind = "expired" if stopped.get("reason") == "expired" or submission.get("expired_at") else "cancelled"
        return BatchOutcome(batch_id, f"batch.{kind}", stopped_file.stat().st_mtime)
    records = instance.get_run_records(RunsFilter(job_name=BATCH_JOB, tags={PARTITION_TAG: batch_id}), limit=1)
    if not records:
        return None
    record = records[0]
    run = record.dagster_run
    ended = record.end_time or record.update_timestamp.timestamp()
    if run.status == DagsterRunStatus.SUCCESS and paths.summary.is_file():
        return BatchOutcome(batch_id, "batch.completed", ended)
    if run.status == DagsterRunStatus.FAILURE and run.tags.get(WILL_RETRY_TAG) != "true":
        return BatchOutcome(batch_id, "batch.failed", ended)
    if run.status == DagsterRunStatus.CANCELED:
        return BatchOutcome(batch_id, "batch.expired" if submission.get("expired_at") else "batch.cancelled", ended)
    return None


def event_id(paths: BatchPaths, event_type: str) -> str:
    """The one id of (batch, event type): retries and restarts re-send it, never a new one.

    The batch's creation time is part of it, so a batch id used again for a new batch gets new events.
    """
    created_at = load_spec(paths).created_at if paths.spec.is_file() else 0.0
    digest = hashlib.sha256(f"{paths.root.name}\n{event_type}\n{created_at!r}".encode()).hexdigest()
    return f"evt_{digest[:32]}"


def batch_event(paths: BatchPaths, outcome: BatchOutcome) -> dict[str, Any]:
    """OpenAI's batch webhook event, with the batch's request counts and metadata added to `data`."""
    data: dict[str, Any] = {"id": outcome.batch_id}
    spec = load_spec(paths) if paths.spec.is_file() else None
    counts = _json(paths.summary) if outcome.type == "batch.completed" else _json(paths.results_dir / "stopped.json")
    if counts is not None:
        data["request_counts"] = {key: int(counts.get(key, 0)) for key in ("total", "completed", "failed")}
    if spec is not None and spec.metadata:
        data["metadata"] = dict(spec.metadata)
    return {"id": event_id(paths, outcome.type), "object": "event", "type": outcome.type,
            "created_at": int(outcome.at), "data": data}
