"""A sensor that re-materialises curation_annotations of a batch when its reviews in Label Studio change."""

from __future__ import annotations

import json
from pathlib import Path

from dagster import (
    AssetKey,
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from integrations.curation.resources import CurationError, LabelStudio, data_filter
from integrations.curation.status import read_status
from resources.storage import BatchStorage

# A Label Studio call per batch and look; only the most recently imported batches are watched.
WATCHED_BATCHES = 50


def review_signature(label_studio: LabelStudio, project_id: int, batch_id: str) -> str:
    """What changes when a batch's reviews change: the annotation count and the latest annotated task's update."""
    filters = data_filter(kind="review", batch_id=batch_id)
    _, annotations = label_studio.count(project_id, filters)
    return f"{annotations}@{label_studio.latest_annotated(project_id, filters) or '-'}"


def _watched(data_dir: str) -> list[tuple[str, int]]:
    """(batch id, review project) of the batches with review tasks, most recently imported first."""
    found = []
    for status_file in Path(data_dir, "batches").glob("*/curation/status.json"):
        status = read_status(BatchStorage(data_dir=data_dir).batch(status_file.parent.parent.name))
        if status is not None and status.project_id is not None and status.tasks_imported:
            found.append((status.tasks_updated_at or 0.0, status.batch_id, status.project_id))
    return [(batch_id, project) for _, batch_id, project in sorted(found, reverse=True)[:WATCHED_BATCHES]]


def build_annotations_sensor(interval_seconds: int) -> SensorDefinition:
    """The sensor, looking every `interval_seconds`; runs carry a run key per review state, so none repeats."""

    @sensor(name="curation_new_annotations", asset_selection=[AssetKey("curation_annotations")],
            minimum_interval_seconds=interval_seconds, default_status=DefaultSensorStatus.RUNNING,
            description="Exports a batch's annotations again when reviewers add or change some in Label Studio.")
    def curation_new_annotations(context: SensorEvaluationContext, storage: BatchStorage,
                                 label_studio: LabelStudio) -> SensorResult | SkipReason:
        seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        requests = []
        try:
            for batch_id, project_id in _watched(storage.data_dir):
                signature = review_signature(label_studio, project_id, batch_id)
                if signature.startswith("0@") or seen.get(batch_id) == signature:
                    continue
                seen[batch_id] = signature
                requests.append(RunRequest(run_key=f"curation:{batch_id}:{signature}", partition_key=batch_id))
        except CurationError as exc:
            return SkipReason(str(exc))
        if not requests:
            return SkipReason("no new annotations")
        return SensorResult(run_requests=requests, cursor=json.dumps(seen))

    return curation_new_annotations
