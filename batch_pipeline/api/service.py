"""The batch service shared by the API server and the CLI: create, describe, list and cancel batches.

A batch's state is never stored as a status string. It is derived, each time it is read, from the
Dagster instance (the batch's runs, found by their partition tag, and their step events) and from
the batch's files (manifest, finished chunks, summary.json), so a batch launched from the UI, by a
sensor or by `vllm-batch run` is described exactly like one created through the API.

What only the API knows about a batch (endpoint, input file, completion window, a cancel or expiry
request) is kept beside its spec in `submission.json`.
"""

from __future__ import annotations

import heapq
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, RunRecord, RunsFilter
from pydantic import BaseModel

from batch_pipeline.api.files import FileNotFound, FileStore, result_file_id
from batch_pipeline.api.schemas import (
    TERMINAL_STATUSES,
    Batch,
    BatchErrorItem,
    BatchErrors,
    ListPage,
    RequestCounts,
    Usage,
    window_seconds,
)
from batch_pipeline.batches import (
    BatchSpec,
    batches_partitions,
    default_batch_id,
    load_spec,
    register_batch,
    valid_batch_id,
)
from batch_pipeline.chunks import iter_requests, output_line_id
from batch_pipeline.input_file import BatchFileError, ValidRequest, scan_batch_file
from batch_pipeline.local_run import failure_message
from batch_pipeline.models import ModelConfigError, ModelRegistry, UnknownModelError
from batch_pipeline.records import CHAT_URL, SUPPORTED_URLS
from batch_pipeline.settings import Settings
from batch_pipeline.submission import clear_ticket, enqueue, queue_dir
from resources.storage import BatchPaths, BatchStorage, atomic_path

BATCH_ID_TAG = "vllm_batch/batch_id"
PARTITION_TAG = "dagster/partition"
_ACTIVE = {DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
           DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING, DagsterRunStatus.MANAGED}
# How far into an input file `create` looks for the model the batch names.
_MODEL_SCAN_LINES = 1000


class BatchNotFound(Exception):
    """No batch has this id (or the id is not a batch id at all)."""


class BatchRequestError(Exception):
    """The request cannot be served as asked; `param` names the offending field, if one does."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class Submission(BaseModel):
    """submission.json: what the API (or `vllm-batch submit`) was asked, beside the batch's spec."""

    endpoint: str = CHAT_URL
    input_file_id: str | None = None
    completion_window: str | None = None
    expires_at: float | None = None
    ticket: str | None = None
    cancel_requested_at: float | None = None
    expired_at: float | None = None
    stopped_at: float | None = None  # when the partial results of a cancelled or expired batch were written


@dataclass
class _ChunkStats:
    rows: int
    failed: int
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Progress:
    """What a batch has done so far, for progress bars."""

    batch: Batch
    done: int
    total: int
    output_tokens: int
    started_at: float | None


def submission_path(paths: BatchPaths) -> Path:
    return paths.root / "submission.json"


def stopped_path(paths: BatchPaths) -> Path:
    return paths.results_dir / "stopped.json"


class BatchService:
    """Batches on one instance and data folder."""

    def __init__(self, settings: Settings, instance: DagsterInstance):
        self.settings = settings
        self.instance = instance
        self.data_dir = settings.resolved_data_dir
        self.storage = BatchStorage(data_dir=str(self.data_dir))
        self.files = FileStore(self.data_dir)
        self._chunk_stats: dict[tuple[str, int], _ChunkStats] = {}
        self._lock = threading.RLock()

    # ---- creating -------------------------------------------------------------------------------

    def registry(self) -> ModelRegistry:
        try:
            return ModelRegistry.from_settings(self.settings)
        except ModelConfigError as exc:
            raise BatchRequestError(str(exc)) from None

    def create(self, input_file_id: str, endpoint: str, completion_window: str = "24h",
               metadata: dict[str, str] | None = None) -> Batch:
        """Register a batch for an uploaded file and queue it for the daemon (`POST /v1/batches`)."""
        try:
            stored = self.files.get(input_file_id)
        except FileNotFound:
            raise BatchRequestError(f"no file with id {input_file_id!r}", "input_file_id", "file_not_found") from None
        if stored.file.purpose != "batch":
            raise BatchRequestError(f"file {input_file_id} has purpose {stored.file.purpose!r}, not 'batch'",
                                    "input_file_id", "invalid_file")
        if endpoint not in SUPPORTED_URLS:
            raise BatchRequestError(f"endpoint must be one of {', '.join(SUPPORTED_URLS)}", "endpoint")
        input_path = self.files.content_path(input_file_id)
        model_name = self._model_named_in(input_path, endpoint)
        try:
            served = self.registry().resolve(model_name)
        except UnknownModelError as exc:
            raise BatchRequestError(str(exc), "input_file_id", "model_not_found") from None
        import uuid

        batch_id = f"batch_{uuid.uuid4().hex}"
        spec = BatchSpec(batch_id=batch_id, input_path=str(input_path), model=served.model, model_name=served.name,
                         engine_args=served.engine_args, chunk_size=self.settings.chunk_size, source="api",
                         metadata=metadata or {})
        now = time.time()
        submission = Submission(endpoint=endpoint, input_file_id=input_file_id, completion_window=completion_window,
                                expires_at=now + window_seconds(completion_window))
        return self._queue(spec, submission, {"vllm_batch/source": "api"})

    def submit_file(self, input_file: Path, model: str, batch_id: str | None = None,
                    metadata: dict[str, str] | None = None) -> Batch:
        """Register a local file as a batch and queue it (`vllm-batch submit`); the file is read in place."""
        input_file = input_file.expanduser().resolve()
        if not input_file.is_file():
            raise BatchRequestError(f"input file not found: {input_file}")
        if input_file.stat().st_size == 0:
            raise BatchRequestError(f"input file is empty: {input_file}")
        try:
            served = self.registry().resolve(model)
        except UnknownModelError as exc:
            raise BatchRequestError(str(exc), "model") from None
        batch_id = batch_id or default_batch_id(input_file, served.model)
        if not valid_batch_id(batch_id):
            raise BatchRequestError(f"invalid batch id {batch_id!r}: use letters, digits, '_', '-' and '.'")
        paths = self.storage.batch(batch_id)
        if paths.spec.exists() and self.describe(batch_id).status in {"validating", "in_progress", "finalizing",
                                                                         "cancelling"}:
            raise BatchRequestError(f"batch {batch_id} is already queued or running")
        endpoint = self._first_url(input_file) or CHAT_URL
        spec = BatchSpec(batch_id=batch_id, input_path=str(input_file), model=served.model, model_name=served.name,
                         engine_args=served.engine_args, chunk_size=self.settings.chunk_size, source="cli",
                         metadata=metadata or {})
        if paths.spec.exists():
            spec = spec.model_copy(update={"created_at": load_spec(paths).created_at})
        stopped_path(paths).unlink(missing_ok=True)
        return self._queue(spec, Submission(endpoint=endpoint), {"vllm_batch/source": "cli"})

    def _queue(self, spec: BatchSpec, submission: Submission, tags: dict[str, str]) -> Batch:
        paths = self.storage.batch(spec.batch_id)
        register_batch(self.instance, paths, spec)
        # The ticket id is only known once the ticket exists, so the submission is written twice:
        # first without it (a crash in between leaves a batch that shows as validating).
        self._save_submission(paths, submission)
        ticket = enqueue(self.data_dir, spec, tags)
        self._save_submission(paths, submission.model_copy(update={"ticket": ticket}))
        return self.describe(spec.batch_id)

    def _scan_head(self, path: Path) -> Iterator[ValidRequest]:
        try:
            for count, item in enumerate(scan_batch_file(path, None, self.settings.max_line_bytes)):
                if count >= _MODEL_SCAN_LINES:
                    return
                if isinstance(item, ValidRequest):
                    yield item
        except BatchFileError as exc:
            raise BatchRequestError(str(exc), "input_file_id", "invalid_file") from None

    def _first_url(self, path: Path) -> str | None:
        return next((item.url for item in self._scan_head(path)), None)

    def _model_named_in(self, path: Path, endpoint: str) -> str:
        """The model the file's requests name (one engine per batch, so the first one binds the batch)."""
        for item in self._scan_head(path):
            if item.url != endpoint:
                raise BatchRequestError(
                    f"line {item.line} has url {item.url!r}, but the batch endpoint is {endpoint!r}",
                    "endpoint", "invalid_file")
            if item.model:
                return item.model
        if self.settings.model:
            return self.settings.model
        raise BatchRequestError(f"no valid request in the first {_MODEL_SCAN_LINES} lines names body.model, and no "
                                "default model is configured (VBATCH_MODEL)", "input_file_id", "invalid_file")

    # ---- reading ------------------------------------------------------------------------------

    def _paths(self, batch_id: str) -> BatchPaths:
        if not valid_batch_id(batch_id):
            raise BatchNotFound(batch_id)
        paths = self.storage.batch(batch_id)
        if not paths.spec.is_file():
            raise BatchNotFound(batch_id)
        return paths

    def _submission(self, paths: BatchPaths) -> Submission:
        path = submission_path(paths)
        return Submission.model_validate_json(path.read_text()) if path.exists() else Submission()

    def _save_submission(self, paths: BatchPaths, submission: Submission) -> None:
        with atomic_path(submission_path(paths)) as tmp:
            tmp.write_text(submission.model_dump_json(indent=2))

    def _latest_run(self, batch_id: str) -> RunRecord | None:
        # Every run of batch_job carries its partition tag, however it was launched (API, sensor, UI, CLI).
        records = self.instance.get_run_records(RunsFilter(tags={PARTITION_TAG: batch_id}), limit=1)
        return records[0] if records else None

    def _ticket_pending(self, submission: Submission) -> bool:
        return bool(submission.ticket) and (queue_dir(self.data_dir) / f"{submission.ticket}.json").exists()

    def _run_for_ticket(self, submission: Submission) -> bool:
        if not submission.ticket:
            return False
        return bool(self.instance.get_run_records(RunsFilter(tags={"dagster/run_key": submission.ticket}), limit=1))

    def describe(self, batch_id: str) -> Batch:
        """The Batch object, derived from the instance and the files; enforces cancel and expiry on the way."""
        with self._lock:
            return self._describe(batch_id)

    def _describe(self, batch_id: str) -> Batch:
        paths = self._paths(batch_id)
        spec = load_spec(paths)
        sub = self._submission(paths)
        record = self._latest_run(batch_id)
        latest = record.dagster_run if record else None
        ended_at = record.end_time if record else None
        active = latest is not None and latest.status in _ACTIVE
        pending = self._ticket_pending(sub) and not self._run_for_ticket(sub)
        now = time.time()

        summary = json.loads(paths.summary.read_text()) if paths.summary.exists() else None
        stopped = json.loads(stopped_path(paths).read_text()) if stopped_path(paths).exists() else None
        finished_run = latest is not None and latest.status == DagsterRunStatus.SUCCESS and summary is not None
        stop_reason = "cancelled" if sub.cancel_requested_at else "expired" if sub.expired_at else None

        # The completion window: a batch still working when it closes stops, and keeps what it finished.
        if (stop_reason is None and sub.expires_at is not None and now > sub.expires_at
                and (active or pending or not finished_run)):
            sub = sub.model_copy(update={"expired_at": now})
            self._save_submission(paths, sub)
            stop_reason = "expired"
        if stop_reason is not None and stopped is None:
            if pending:
                clear_ticket(self.data_dir, sub.ticket or "")
                pending = False
            if active:
                self._stop_run(latest)  # type: ignore[arg-type]
            else:
                stopped = self._write_stopped_results(paths, spec, stop_reason)
                sub = sub.model_copy(update={"stopped_at": time.time()})
                self._save_submission(paths, sub)

        steps = self._step_starts(latest) if latest is not None else {}
        endpoint = sub.endpoint if submission_path(paths).exists() else self._endpoint_of(spec)
        batch = Batch(
            id=batch_id, endpoint=endpoint, model=spec.model_name,
            input_file_id=sub.input_file_id or self._input_file_id(spec) or "",
            completion_window=sub.completion_window or "24h",
            status="validating", created_at=int(spec.created_at),
            expires_at=int(sub.expires_at) if sub.expires_at else None,
            in_progress_at=_int(steps.get("batch_chunks")), finalizing_at=_int(steps.get("batch_results")),
            metadata=spec.metadata or None,
        )
        if stop_reason == "cancelled":
            batch.cancelling_at = int(sub.cancel_requested_at or now)
            batch.status = "cancelled" if stopped is not None else "cancelling"
            batch.cancelled_at = _int(sub.stopped_at)
        elif stop_reason == "expired":
            batch.expired_at = int(sub.expired_at or now)
            batch.status = "expired" if stopped is not None else "finalizing"
        elif active:
            assert latest is not None
            if latest.status == DagsterRunStatus.CANCELING:
                batch.status, batch.cancelling_at = "cancelling", _int(steps.get("__canceling__")) or int(now)
            elif "batch_results" in steps:
                batch.status = "finalizing"
            elif "batch_chunks" in steps:
                batch.status = "in_progress"
        elif pending:
            batch.status = "validating"
        elif latest is not None and latest.status == DagsterRunStatus.CANCELED and summary is None:
            # Cancelled from the UI (or by run monitoring): keep what was finished, as an API cancel does.
            if stopped is None:
                stopped = self._write_stopped_results(paths, spec, "cancelled")
            batch.status, batch.cancelled_at = "cancelled", _int(ended_at)
        elif latest is not None and latest.status == DagsterRunStatus.FAILURE:
            batch.status, batch.failed_at = "failed", _int(ended_at)
            batch.errors = BatchErrors(data=[self._failure(latest)])
        elif summary is not None:
            batch.status = "completed"
            batch.completed_at = _int(ended_at) or int(paths.summary.stat().st_mtime)
            batch.finalizing_at = batch.finalizing_at or batch.completed_at
            batch.in_progress_at = batch.in_progress_at or int(spec.created_at)

        self._fill_counts(batch, paths, summary if batch.status == "completed" else None,
                          stopped if batch.status in ("cancelled", "expired") else None)
        if batch.status in ("completed", "cancelled", "expired"):
            # A finished batch always has an output file (maybe empty); a stopped one only if it got somewhere.
            if paths.output.exists() and (batch.status == "completed" or paths.output.stat().st_size > 0):
                batch.output_file_id = self.files.register_result(batch_id, "output", paths.output)
            if paths.errors.exists() and paths.errors.stat().st_size > 0:
                batch.error_file_id = self.files.register_result(batch_id, "errors", paths.errors)
        return batch

    def _input_file_id(self, spec: BatchSpec) -> str | None:
        path = Path(spec.input_path)
        if not path.is_file():
            return None
        return self.files.register_path(result_file_id(spec.batch_id, "input"), path, path.name, "batch",
                                        spec.batch_id)

    def _endpoint_of(self, spec: BatchSpec) -> str:
        # A batch started outside the API (UI, sensor, `vllm-batch run`): its lines say which endpoint.
        try:
            return self._first_url(Path(spec.input_path)) or CHAT_URL
        except BatchRequestError:
            return CHAT_URL

    def _stop_run(self, run: DagsterRun) -> None:
        if run.status != DagsterRunStatus.CANCELING:
            self.instance.run_coordinator.cancel_run(run.run_id)

    def _step_starts(self, run: DagsterRun) -> dict[str, float]:
        starts: dict[str, float] = {}
        for entry in self.instance.all_logs(run.run_id, of_type={DagsterEventType.STEP_START,
                                                                 DagsterEventType.RUN_CANCELING}):
            key = entry.step_key or "__canceling__"
            starts.setdefault(key, entry.timestamp)
        return starts

    def _failure(self, run: DagsterRun) -> BatchErrorItem:
        logs = self.instance.all_logs(run.run_id, of_type={DagsterEventType.STEP_FAILURE})
        events = [entry.dagster_event for entry in logs if entry.dagster_event is not None]
        step = events[0].step_key if events else None
        code = "invalid_file" if step == "batch_input" else "batch_failed"
        return BatchErrorItem(code=code, message=failure_message(events))

    def _fill_counts(self, batch: Batch, paths: BatchPaths, summary: dict | None, stopped: dict | None) -> None:
        totals = summary or stopped
        if totals is not None:
            batch.request_counts = RequestCounts(total=totals["total"], completed=totals["completed"],
                                                 failed=totals["failed"])
            batch.usage = _usage(totals["prompt_tokens"], totals["completion_tokens"])
            return
        if not paths.manifest.exists():
            return
        manifest = json.loads(paths.manifest.read_text())
        stats = self._finished_chunk_stats(paths, manifest["num_chunks"])
        failed = manifest["invalid_lines"] + sum(s.failed for s in stats)
        batch.request_counts = RequestCounts(total=manifest["valid_requests"] + manifest["invalid_lines"],
                                             completed=sum(s.rows - s.failed for s in stats), failed=failed)
        batch.usage = _usage(sum(s.prompt_tokens for s in stats), sum(s.completion_tokens for s in stats))

    def _finished_chunk_stats(self, paths: BatchPaths, num_chunks: int) -> list[_ChunkStats]:
        stats = []
        for index in sorted(paths.finished_chunks() & set(range(num_chunks))):
            path = paths.chunk(index)
            try:
                key = (str(path), path.stat().st_mtime_ns)
            except FileNotFoundError:
                continue
            if key not in self._chunk_stats:
                table = pq.read_table(path, columns=["error", "prompt_tokens", "completion_tokens"])
                self._chunk_stats[key] = _ChunkStats(
                    rows=table.num_rows, failed=table.num_rows - table["error"].null_count,
                    prompt_tokens=pa.compute.sum(table["prompt_tokens"]).as_py() or 0,
                    completion_tokens=pa.compute.sum(table["completion_tokens"]).as_py() or 0)
            stats.append(self._chunk_stats[key])
        return stats

    def _write_stopped_results(self, paths: BatchPaths, spec: BatchSpec, reason: str) -> dict:
        """Write the output and error files of a batch stopped early: finished chunks, then one error per rest."""
        # The same line formats as batch_results writes for a finished batch.
        from assets.batch_results import invalid_lines, output_line

        code, message = (("batch_cancelled", "the batch was cancelled before this request ran") if reason == "cancelled"
                         else ("batch_expired", "the batch's completion window closed before this request ran"))
        counts = {"total": 0, "completed": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0,
                  "reason": reason}
        manifest = json.loads(paths.manifest.read_text()) if paths.manifest.exists() else None
        with atomic_path(paths.output) as output_tmp, output_tmp.open("w") as output, \
                atomic_path(paths.errors) as errors_tmp, errors_tmp.open("w") as errors:
            if manifest is not None:
                num_chunks, chunk_size = manifest["num_chunks"], manifest["chunk_size"]
                finished = sorted(paths.finished_chunks() & set(range(num_chunks)))
                chunk_errors: list[tuple[int, str]] = []
                for index in finished:
                    for row in pq.read_table(paths.chunk(index)).to_pylist():
                        if row["error"] is None:
                            counts["completed"] += 1
                            counts["prompt_tokens"] += row["prompt_tokens"]
                            counts["completion_tokens"] += row["completion_tokens"]
                            output.write(output_line(row))
                        else:
                            record = {"id": row["id"], "custom_id": row["custom_id"], "response": None,
                                      "error": json.loads(row["error"])}
                            chunk_errors.append((row["line"], json.dumps(record, separators=(",", ":")) + "\n"))

                def unfinished() -> Iterator[tuple[int, str]]:
                    for _, row in iter_requests(paths, chunk_size, set(finished)):
                        record = {"id": output_line_id(spec.batch_id, row["line"]), "custom_id": row["custom_id"],
                                  "response": None, "error": {"code": code, "message": message, "line": row["line"]}}
                        yield row["line"], json.dumps(record, separators=(",", ":")) + "\n"

                for _, text in heapq.merge(invalid_lines(paths), chunk_errors, unfinished(), key=lambda i: i[0]):
                    errors.write(text)
                    counts["failed"] += 1
                counts["total"] = manifest["valid_requests"] + manifest["invalid_lines"]
        with atomic_path(stopped_path(paths)) as tmp:
            tmp.write_text(json.dumps(counts))
        return counts

    # ---- listing and cancelling ---------------------------------------------------------------

    def list(self, limit: int = 20, after: str | None = None) -> ListPage[Batch]:
        """Batches newest first, OpenAI's cursor paging: `after` is the last id of the previous page."""
        entries = []
        for batch_id in self.instance.get_dynamic_partitions(batches_partitions.name):
            paths = self.storage.batch(batch_id)
            if valid_batch_id(batch_id) and paths.spec.is_file():
                entries.append((load_spec(paths).created_at, batch_id))
        entries.sort(reverse=True)
        ids = [batch_id for _, batch_id in entries]
        start = 0
        if after is not None:
            if after not in ids:
                raise BatchRequestError(f"no batch with id {after!r}", "after", "batch_not_found")
            start = ids.index(after) + 1
        page = ids[start:start + limit]
        data = [self.describe(batch_id) for batch_id in page]
        return ListPage[Batch](data=data, first_id=page[0] if page else None, last_id=page[-1] if page else None,
                               has_more=start + limit < len(ids))

    def cancel(self, batch_id: str) -> Batch:
        """Stop a batch: clear its ticket or terminate its run; what it finished stays in its output file."""
        with self._lock:
            batch = self._describe(batch_id)
            if batch.status in ("cancelled", "cancelling"):
                return batch
            if batch.status in TERMINAL_STATUSES:
                raise BatchRequestError(f"cannot cancel batch {batch_id}: its status is {batch.status}",
                                        code="batch_not_cancellable")
            paths = self._paths(batch_id)
            sub = self._submission(paths).model_copy(update={"cancel_requested_at": time.time()})
            self._save_submission(paths, sub)
            return self._describe(batch_id)

    def enforce_windows(self) -> None:
        """Describe every batch whose completion window may have closed, which stops it."""
        now = time.time()
        root = self.data_dir / "batches"
        if not root.is_dir():
            return
        for folder in root.iterdir():
            path = folder / "submission.json"
            try:
                sub = Submission.model_validate_json(path.read_text())
            except (FileNotFoundError, ValueError):
                continue
            if sub.expires_at and now > sub.expires_at and sub.stopped_at is None and sub.expired_at is None:
                try:
                    self.describe(folder.name)
                except BatchNotFound:
                    continue

    # ---- results ------------------------------------------------------------------------------

    def progress(self, batch_id: str) -> Progress:
        """The batch plus what a progress bar shows."""
        batch = self.describe(batch_id)
        counts = batch.request_counts
        return Progress(batch, counts.completed + counts.failed, counts.total, batch.usage.output_tokens,
                        batch.in_progress_at)

    def result_path(self, batch_id: str, kind: str) -> Path | None:
        """The output ('output') or error ('errors') file of a finished batch, if it has one."""
        batch = self.describe(batch_id)
        file_id = batch.output_file_id if kind == "output" else batch.error_file_id
        return self.files.content_path(file_id) if file_id else None


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(input_tokens=prompt_tokens, output_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def _int(value: float | None) -> int | None:
    return int(value) if value is not None else None


