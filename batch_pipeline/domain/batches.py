"""A batch: its spec on disk, what its submitter asked for, its partition in `batches`, and the records its
stages leave beside it (input/manifest.json, results/summary.json), each read and written in one place."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any, TypeVar

from dagster import DynamicPartitionsDefinition
from pydantic import BaseModel, Field, ValidationError

from batch_pipeline.domain.constants import BATCHES_PARTITIONS
from batch_pipeline.domain.records import CHAT_URL
from resources.storage import BatchPaths, BatchStorage, Location, atomic_path

batches_partitions = DynamicPartitionsDefinition(name=BATCHES_PARTITIONS)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_Record = TypeVar("_Record", bound=BaseModel)


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
    rejected_code: str | None = Field(default=None, description="The refusal as a code (the failed batch's errors).")


def valid_batch_id(batch_id: str) -> bool:
    """Batch ids are partition keys and folder names: letters, digits, '_', '-', '.'."""
    return bool(_ID_RE.match(batch_id)) and ".." not in batch_id


class BatchNotFound(Exception):
    """No batch has this id (or the id is not a batch id at all); the API answers it with its 404."""


def existing_batch(data_dir: Location, batch_id: str) -> BatchPaths:
    """The paths of a registered batch, or BatchNotFound (also for ids that could escape DATA_DIR)."""
    if not valid_batch_id(batch_id):
        raise BatchNotFound(batch_id)
    paths = BatchStorage(data_dir=str(data_dir)).batch(batch_id)
    if not paths.spec.is_file():
        raise BatchNotFound(batch_id)
    return paths


def file_digest(path: Location) -> str:
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


def save_record(path: Location, record: BaseModel) -> None:
    """Write one of a batch's records as JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(record.model_dump_json(indent=2))


def save_spec(paths: BatchPaths, spec: BatchSpec) -> None:
    """Write batch.json atomically."""
    save_record(paths.spec, spec)


def load_spec(paths: BatchPaths) -> BatchSpec:
    """Read batch.json."""
    return BatchSpec.model_validate_json(paths.spec.read_text())


class Submission(BaseModel):
    """submission.json: what a queued batch was asked for (API or `vllm-batch submit`), beside its spec."""

    endpoint: str = CHAT_URL
    input_file_id: str | None = None
    completion_window: str | None = None
    expires_at: float | None = None
    ticket: str | None = None
    cancel_requested_at: float | None = None
    expired_at: float | None = None
    stopped_at: float | None = None  # when the partial results of a cancelled or expired batch were written
    launch_error: str | None = None  # why its ticket could not be launched (the batch then shows as failed)
    owner: str | None = None  # the API key's fingerprint (batch_pipeline/domain/tenancy.py); None: no tenant
    output_expires_after: int | None = None  # seconds: its output and error files expire this long after creation


def load_submission(paths: BatchPaths) -> Submission | None:
    """submission.json, or None for a batch that was not queued (UI, sensor, `vllm-batch run`)."""
    try:
        return Submission.model_validate_json(paths.submission.read_text())
    except FileNotFoundError:
        return None


def save_submission(paths: BatchPaths, submission: Submission) -> None:
    """Write submission.json atomically."""
    save_record(paths.submission, submission)


class BatchRecordError(ValueError):
    """A record a stage left beside the batch (manifest.json, summary.json) cannot be read; one line says why."""


class BatchManifest(BaseModel):
    """input/manifest.json: what batch_input made of the file; it fixes the chunks every later stage reads."""

    batch_id: str
    fingerprint: str = Field(description="Input sha256, model and chunk size: chunks made under another are stale.")
    input_sha256: str
    model: str
    model_name: str
    chunk_size: int
    valid_requests: int
    invalid_lines: int
    num_chunks: int
    # Valid requests per endpoint URL; manifests written before embeddings batches have none.
    endpoints: dict[str, int] = Field(default_factory=dict)


class BatchSummary(BaseModel):
    """results/summary.json: a finished batch's counts and result files, written by batch_results."""

    batch_id: str
    model: str = Field(description="The served model name.")
    total: int
    completed: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens from vLLM's prefix cache; absent from summaries written before it
    from_cache: int = 0  # requests answered from the response cache; absent from summaries written before it
    output_file: str
    error_file: str


def load_record(model: type[_Record], path: Location) -> _Record | None:
    """One of a batch's records, None if absent; BatchRecordError (one line) if damaged."""
    # Extra fields are ignored, so a file written by a later version still loads here.
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, error['loc'])) or 'the file'}: {error['msg']}"
                             for error in exc.errors(include_url=False))
        raise BatchRecordError(f"{path} is damaged ({problems})") from None


def load_manifest(paths: BatchPaths) -> BatchManifest | None:
    """input/manifest.json, or None before batch_input has written it; BatchRecordError if damaged."""
    return load_record(BatchManifest, paths.manifest)


def save_manifest(paths: BatchPaths, manifest: BatchManifest) -> None:
    """Write input/manifest.json atomically."""
    save_record(paths.manifest, manifest)


def load_summary(paths: BatchPaths) -> BatchSummary | None:
    """results/summary.json, or None until batch_results has merged the batch; BatchRecordError if damaged."""
    return load_record(BatchSummary, paths.summary)


def save_summary(paths: BatchPaths, summary: BatchSummary) -> None:
    """Write results/summary.json atomically."""
    save_record(paths.summary, summary)
