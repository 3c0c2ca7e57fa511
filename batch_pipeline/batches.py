"""A batch: its spec on disk and its partition in the `batches` dynamic partitions definition."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, DynamicPartitionsDefinition
from pydantic import BaseModel, Field

from resources.storage import BatchPaths, atomic_path

batches_partitions = DynamicPartitionsDefinition(name="batches")

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class BatchSpec(BaseModel):
    """What a batch is: written once when the batch is registered, read by every stage."""

    batch_id: str
    input_path: str
    model: str = Field(description="What the engine loads: a local directory or a hub id.")
    model_name: str = Field(description="The name responses report; lines may name this or `model`.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Per-model vLLM engine arguments.")
    chunk_size: int
    created_at: float = Field(default_factory=time.time)
    source: str = "cli"
    metadata: dict[str, str] = Field(default_factory=dict)
    rejected: str | None = Field(default=None, description="Why intake refused the file; its run fails with this.")


def valid_batch_id(batch_id: str) -> bool:
    """Batch ids are partition keys and folder names: letters, digits, '_', '-', '.'."""
    return bool(_ID_RE.match(batch_id)) and ".." not in batch_id


def file_digest(path: Path) -> str:
    """sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def default_batch_id(input_path: Path, model: str) -> str:
    """A stable id for (file content, model), so re-running the same command resumes the same batch."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", input_path.stem).strip("-")[:48] or "batch"
    digest = hashlib.sha256(f"{file_digest(input_path)}:{model}".encode()).hexdigest()[:10]
    return f"{stem}-{digest}"


def save_spec(paths: BatchPaths, spec: BatchSpec) -> None:
    """Write batch.json atomically."""
    with atomic_path(paths.spec) as tmp:
        tmp.write_text(spec.model_dump_json(indent=2))


def load_spec(paths: BatchPaths) -> BatchSpec:
    """Read batch.json."""
    return BatchSpec.model_validate_json(paths.spec.read_text())


def register_batch(instance: DagsterInstance, paths: BatchPaths, spec: BatchSpec) -> None:
    """Write the spec and add the batch's partition (idempotent)."""
    if not valid_batch_id(spec.batch_id):
        raise ValueError(f"invalid batch id {spec.batch_id!r}: use letters, digits, '_', '-' and '.'")
    save_spec(paths, spec)
    if not instance.has_dynamic_partition(batches_partitions.name, spec.batch_id):
        instance.add_dynamic_partitions(batches_partitions.name, [spec.batch_id])


def read_json(path: Path) -> dict:
    """A small JSON file as a dict."""
    return json.loads(path.read_text())
