"""Which terminal state a batch is in, and the OpenAI webhook event that announces it.

The status comes from the core's derivation (batch_pipeline/domain/status.py), so a webhook says exactly what
`GET /v1/batches/{id}` and `vllm-batch status` say.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from dagster import DagsterInstance, DagsterRunStatus

from batch_pipeline.domain.batch_object import TERMINAL_STATUSES
from batch_pipeline.domain.batches import load_spec, load_summary
from batch_pipeline.domain.status import ChunkStats, derive_batch, read_facts
from resources.storage import BatchPaths

EVENT_TYPES = ("batch.completed", "batch.failed", "batch.cancelled", "batch.expired")
BATCH_JOB = "batch_job"
PARTITION_TAG = "dagster/partition"
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
    """The batch's terminal state, or None while it is queued, running, cancelling or about to be retried.

    Read from the same derivation as the API's and the CLI's status (batch_pipeline/domain/status.py).
    """
    if not paths.spec.is_file():
        return None
    data_dir = paths.root.parent.parent  # DATA_DIR/batches/<batch id>
    batch = derive_batch(read_facts(instance, paths, data_dir, ChunkStats()), time.time())
    if batch.status not in TERMINAL_STATUSES:
        return None
    at = {"completed": batch.completed_at, "failed": batch.failed_at, "cancelled": batch.cancelled_at,
          "expired": batch.expired_at}[batch.status]
    return BatchOutcome(batch.id, f"batch.{batch.status}", float(at or time.time()))


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
    if outcome.type == "batch.completed":
        summary = load_summary(paths)
        counts = summary.model_dump() if summary is not None else None
    else:
        counts = _json(paths.stopped)
    if counts is not None:
        data["request_counts"] = {key: int(counts.get(key, 0)) for key in ("total", "completed", "failed")}
    if spec is not None and spec.metadata:
        data["metadata"] = dict(spec.metadata)
    return {"id": event_id(paths, outcome.type), "object": "event", "type": outcome.type,
            "created_at": int(outcome.at), "data": data}
