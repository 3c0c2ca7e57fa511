"""The read-only curation status of a batch, from the files the curation assets write (no Label Studio call)."""

from __future__ import annotations

from pathlib import Path

from integrations.curation.paths import CurationPaths
from integrations.curation.records import CurationStatus
from resources.storage import BatchPaths, atomic_path


def read_status(paths: BatchPaths) -> CurationStatus | None:
    """The batch's curation status, or None when curation never ran for it."""
    status = CurationPaths(paths).status
    if not status.is_file():
        return None
    return CurationStatus.model_validate_json(status.read_text())


def update_status(paths: BatchPaths, **changes: object) -> CurationStatus:
    """Merge changes into the batch's status file (written atomically) and return the result."""
    current = read_status(paths) or CurationStatus(batch_id=paths.root.name)
    updated = current.model_validate({**current.model_dump(), **changes})
    target: Path = CurationPaths(paths).status
    with atomic_path(target) as tmp:
        tmp.write_text(updated.model_dump_json(indent=2))
    return updated


def training_file(paths: BatchPaths) -> Path | None:
    """The batch's training.jsonl, when curation_annotations has written it."""
    path = CurationPaths(paths).training
    return path if path.is_file() else None
