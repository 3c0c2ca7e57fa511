"""The batch service shared by the API server and the CLI: an adapter from their calls to the domain.

Taking a batch in is batch_pipeline/domain/intake.py, its status batch_pipeline/domain/status.py, stopping it
batch_pipeline/domain/stopping.py; this module adds what only the API has (uploaded files, file ids for a
batch's results, completion windows, cursor paging, tenants) and turns domain errors into API errors.

Every call that reads or changes a batch or file takes the `tenant` asking (batch_pipeline/domain/tenancy.py):
a batch or file it does not see is BatchNotFound / FileNotFound, exactly as an unknown id. The command
line asks as OPERATOR (the default), which sees every tenant.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import DagsterInstance

from batch_pipeline.domain.batches import (
    BatchNotFound,
    BatchRecordError,
    BatchSpec,
    Submission,
    default_batch_id,
    existing_batch,
    load_spec,
    load_submission,
    save_submission,
    valid_batch_id,
)
from batch_pipeline.domain.constants import BATCHES_PARTITIONS, OWNER_TAG, SOURCE_TAG
from batch_pipeline.domain.estimate import Estimator
from batch_pipeline.domain.intake import HEAD_LINES, IntakeError, checked_input, model_for_endpoint, register, resolve_model, survey
from batch_pipeline.domain.models import ModelConfigError, ModelRegistry
from batch_pipeline.domain.queue_tickets import enqueue
from batch_pipeline.domain.records import CHAT_URL, SUPPORTED_URLS
from batch_pipeline.domain.replay import load_replay_record, public_view
from batch_pipeline.domain.results import partial_output_lines
from batch_pipeline.domain.settings import Settings
from batch_pipeline.domain.status import BatchFacts, ChunkStats, EndedRuns, derive_batch, read_facts, read_many_facts
from batch_pipeline.domain.stopping import enforce_stop, enforce_stops, request_cancel
from batch_pipeline.domain.tenancy import OPERATOR, Tenant
from batch_pipeline.entrypoints.api.files import FileNotFound, FileStore, result_file_id
from batch_pipeline.entrypoints.api.schemas import TERMINAL_STATUSES, Batch, ExpiresAfter, ListPage, expires_seconds, window_seconds
from resources.storage import BatchPaths, BatchStorage, Location, location

log = logging.getLogger(__name__)

_BUSY = {"validating", "in_progress", "finalizing", "cancelling"}


class BatchRequestError(Exception):
    """The request cannot be served as asked; `param` names the offending field, if one does."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code

    @classmethod
    def from_intake(cls, exc: IntakeError, param: str | None = None) -> BatchRequestError:
        return cls(str(exc), param or exc.param, exc.code)


@dataclass
class Progress:
    """What a batch has done so far, for progress bars."""

    batch: Batch
    done: int
    total: int
    output_tokens: int
    started_at: float | None


class BatchService:
    """Batches on one instance and data folder."""

    def __init__(self, settings: Settings, instance: DagsterInstance):
        self.settings = settings
        self.instance = instance
        self.data_dir = location(settings.data_root)  # batches and queue tickets (maybe an object store)
        self.storage = BatchStorage(data_dir=settings.data_root)
        self.files = FileStore(settings.resolved_data_dir)  # uploads stay on this host's disk
        self._stats = ChunkStats()
        self._ended = EndedRuns()
        self.estimator = Estimator(settings, instance, self._stats, self._ended)
        self._lock = threading.RLock()

    def registry(self) -> ModelRegistry:
        try:
            return ModelRegistry.from_settings(self.settings)
        except ModelConfigError as exc:
            raise BatchRequestError(str(exc)) from None

    # ---- creating -------------------------------------------------------------------------------

    def create(self, input_file_id: str, endpoint: str, completion_window: str = "24h",
               metadata: dict[str, str] | None = None, tenant: Tenant = OPERATOR,
               output_expires_after: ExpiresAfter | None = None) -> Batch:
        """Register a batch for an uploaded file and queue it for the daemon (`POST /v1/batches`); the
        batch belongs to `tenant`, whose file it must be."""
        try:
            output_expiry = expires_seconds(output_expires_after, "output_expires_after")
        except ValueError as exc:
            raise BatchRequestError(str(exc), "output_expires_after", "invalid_value") from None
        try:
            stored = self.files.get(input_file_id, tenant)
        except FileNotFound:
            raise BatchRequestError(f"no file with id {input_file_id!r}", "input_file_id", "file_not_found") from None
        if stored.file.purpose != "batch":
            raise BatchRequestError(f"file {input_file_id} has purpose {stored.file.purpose!r}, not 'batch'",
                                    "input_file_id", "invalid_file")
        if endpoint not in SUPPORTED_URLS:
            raise BatchRequestError(f"endpoint must be one of {', '.join(SUPPORTED_URLS)}", "endpoint")
        input_path = self.files.content_path(input_file_id, tenant)
        try:
            served = model_for_endpoint(self.settings, input_path, endpoint)
            spec = register(self.settings, self.instance, input_path, served, source="api",
                            batch_id=f"batch_{uuid.uuid4().hex}", metadata=metadata)
        except IntakeError as exc:
            raise BatchRequestError.from_intake(exc) from None
        submission = Submission(endpoint=endpoint, input_file_id=input_file_id, completion_window=completion_window,
                                # Whole seconds, as the Batch object shows it: the window closes when it says.
                                expires_at=float(int(spec.created_at) + window_seconds(completion_window)),
                                owner=tenant.owner, output_expires_after=output_expiry)
        return self._queue(spec, submission, "api", tenant, input_path)

    def submit_file(self, input_file: Path, model: str, batch_id: str | None = None,
                    metadata: dict[str, str] | None = None) -> Batch:
        """Register a local file as a batch and queue it (`vllm-batch submit`); the file is read in place."""
        try:
            path = checked_input(input_file)
            served = resolve_model(self.settings, model)
            batch_id = batch_id or default_batch_id(path, served.model)
            if not valid_batch_id(batch_id):
                raise IntakeError(f"invalid batch id {batch_id!r}: use letters, digits, '_', '-' and '.'")
            paths = self.storage.batch(batch_id)
            if paths.spec.exists() and self.describe(batch_id, OPERATOR).status in _BUSY:
                raise BatchRequestError(f"batch {batch_id} is already queued or running")
            spec = register(self.settings, self.instance, path, served, source="cli", batch_id=batch_id,
                            metadata=metadata)
        except IntakeError as exc:
            raise BatchRequestError.from_intake(exc) from None
        paths.stopped.unlink(missing_ok=True)  # queued again: an earlier stop no longer describes it
        endpoint = survey(path, self.settings.max_line_bytes, HEAD_LINES).first_url or CHAT_URL
        return self._queue(spec, Submission(endpoint=endpoint), "cli", OPERATOR, path)

    def _queue(self, spec: BatchSpec, submission: Submission, source: str, tenant: Tenant, input_path: Path) -> Batch:
        paths = self.storage.batch(spec.batch_id)
        # Estimated before its ticket exists: after what is queued before it, and never after itself.
        self.estimator.at_creation(spec, input_path)
        # The ticket id is only known once the ticket exists, so the submission is written twice:
        # first without it (a crash in between leaves a batch that shows as validating).
        save_submission(paths, submission)
        tags = {SOURCE_TAG: source, **({OWNER_TAG: submission.owner} if submission.owner else {})}
        ticket = enqueue(self.data_dir, spec, tags)
        save_submission(paths, submission.model_copy(update={"ticket": ticket}))
        return self.describe(spec.batch_id, tenant)

    # ---- reading --------------------------------------------------------------------------------

    def _paths(self, batch_id: str, tenant: Tenant) -> BatchPaths:
        paths = existing_batch(self.data_dir, batch_id)
        if not tenant.sees(_owner(paths)):
            raise BatchNotFound(batch_id)
        return paths

    def check_visible(self, batch_id: str, tenant: Tenant) -> None:
        """BatchNotFound unless the batch exists and `tenant` sees it (for routes that read it otherwise)."""
        self._paths(batch_id, tenant)

    def describe(self, batch_id: str, tenant: Tenant = OPERATOR) -> Batch:
        """The Batch object as of now, derived from the instance and the files (nothing is written)."""
        paths = self._paths(batch_id, tenant)
        return self._batch_object(paths, self._facts(paths))

    def _facts(self, paths: BatchPaths) -> BatchFacts:
        return read_facts(self.instance, paths, self.data_dir, self._stats, self._ended)

    def _batch_object(self, paths: BatchPaths, facts: BatchFacts,
                      unfinished: Sequence[tuple[BatchSpec, Batch, int]] | None = None) -> Batch:
        # describe and list both end here, so a listed batch is the batch `GET /v1/batches/{id}` returns.
        submission = facts.submission
        batch = derive_batch(facts, time.time())
        batch.completion_estimate = self.estimator.for_batch(
            batch, facts.spec, facts.progress.completion_tokens if facts.progress else 0, unfinished)
        return self.files.attach(batch, paths, Path(facts.spec.input_path),
                                 submission.owner if submission else None,
                                 submission.output_expires_after if submission else None)

    def list(self, limit: int = 20, after: str | None = None, tenant: Tenant = OPERATOR) -> ListPage[Batch]:
        """Batches `tenant` sees, newest first, OpenAI's cursor paging: `after` is the last id of the previous page.

        The page's batches are read together (read_many_facts: one query for all their runs), so a page
        costs about what one batch does, not twenty times as much.
        """
        entries = []
        for batch_id in self.instance.get_dynamic_partitions(BATCHES_PARTITIONS):
            paths = self.storage.batch(batch_id)
            if valid_batch_id(batch_id) and paths.spec.is_file() and tenant.sees(_owner(paths)):
                entries.append((load_spec(paths).created_at, batch_id))
        entries.sort(reverse=True)
        ids = [batch_id for _, batch_id in entries]
        start = 0
        if after is not None:
            if after not in ids:
                raise BatchRequestError(f"no batch with id {after!r}", "after", "batch_not_found")
            start = ids.index(after) + 1
        page = [self.storage.batch(batch_id) for batch_id in ids[start:start + limit]]
        facts = read_many_facts(self.instance, page, self.data_dir, self._stats, self._ended)
        # What is queued or running, read once for the page's running batches' estimates.
        unfinished = self.estimator.unfinished() if any(not batch.finished for batch in facts) else []
        data = [self._batch_object(paths, batch, unfinished) for paths, batch in zip(page, facts, strict=True)]
        return ListPage[Batch](data=data, first_id=data[0].id if data else None,
                               last_id=data[-1].id if data else None, has_more=start + limit < len(ids))

    # ---- stopping -------------------------------------------------------------------------------

    def cancel(self, batch_id: str, tenant: Tenant = OPERATOR) -> Batch:
        """Stop a batch: clear its ticket or cancel its run; what it finished stays in its output file."""
        with self._lock:
            batch = self.describe(batch_id, tenant)
            if batch.status in ("cancelled", "cancelling"):
                return batch
            if batch.status in TERMINAL_STATUSES:
                raise BatchRequestError(f"cannot cancel batch {batch_id}: its status is {batch.status}",
                                        code="batch_not_cancellable")
            paths = self._paths(batch_id, tenant)
            now = time.time()
            request_cancel(paths, self._facts(paths), now)
            facts = self._facts(paths)  # with the request recorded
            enforce_stop(self.instance, paths, self.data_dir, facts, now)
            return self.describe(batch_id, tenant)

    def enforce_stops(self) -> Sequence[str]:
        """Carry out every due cancel and expiry (the API server does this on a timer)."""
        with self._lock:
            return enforce_stops(self.instance, self.data_dir, self._stats, self._ended)

    def expire_files(self) -> Sequence[str]:
        """Delete every file whose expiry has passed (the API server does this on a timer); returns their ids.

        A finished batch with `output_expires_after` has its output and error files registered first,
        so that they expire on time even when nobody read the batch after it finished.
        """
        with self._lock:
            for batch_id in self.instance.get_dynamic_partitions(BATCHES_PARTITIONS):
                paths = self.storage.batch(batch_id)
                if not valid_batch_id(batch_id) or not (paths.summary.exists() or paths.stopped.exists()):
                    continue
                submission = load_submission(paths) if paths.spec.is_file() else None
                if submission is None or submission.output_expires_after is None:
                    continue
                unregistered = [path for kind, path in (("output", paths.output), ("errors", paths.errors))
                                if path.exists() and path.stat().st_size > 0
                                and not (self.files.root / result_file_id(batch_id, kind)).exists()]
                if unregistered:
                    try:
                        self.describe(batch_id)  # registers its result files, with their expiry
                    except Exception:  # one broken batch must not keep the other files from expiring
                        log.exception("could not register the result files of batch %s", batch_id)
            return self.files.expire_due([self.settings.resolved_data_dir, self.data_dir], time.time())

    # ---- results --------------------------------------------------------------------------------

    def progress(self, batch_id: str, tenant: Tenant = OPERATOR) -> Progress:
        """The batch plus what a progress bar shows."""
        batch = self.describe(batch_id, tenant)
        counts = batch.request_counts
        return Progress(batch, counts.completed + counts.failed, counts.total, batch.usage.output_tokens,
                        batch.in_progress_at)

    def replay_record(self, batch_id: str, tenant: Tenant = OPERATOR) -> dict[str, Any]:
        """The finished batch's replay record as the API shows it (credential-like engine args redacted)."""
        paths = self._paths(batch_id, tenant)
        try:
            record = load_replay_record(paths)
        except BatchRecordError as exc:
            raise BatchRequestError(str(exc), code="replay_record_damaged") from None
        if record is None:
            raise BatchRequestError(f"batch {batch_id} has no replay record: it has not finished",
                                    code="batch_not_finished")
        return public_view(record)

    def result_path(self, batch_id: str, kind: str, tenant: Tenant = OPERATOR) -> Location | None:
        """The output ('output') or error ('errors') file of a finished batch, if it has one (an object
        when the data root is an object store)."""
        batch = self.describe(batch_id, tenant)
        file_id = batch.output_file_id if kind == "output" else batch.error_file_id
        return self.files.content(file_id, tenant) if file_id else None

    def partial_output(self, batch_id: str, tenant: Tenant = OPERATOR) -> Iterator[str]:
        """The output lines so far: of a finished batch, its output file; of a running one, the lines of
        its chunks finished without a gap from the first (a prefix of the final file, byte for byte)."""
        batch = self.describe(batch_id, tenant)
        if batch.status in TERMINAL_STATUSES:
            path = self.files.content(batch.output_file_id, tenant) if batch.output_file_id else None
            return _lines_of(path) if path is not None else iter(())
        return partial_output_lines(self._paths(batch_id, tenant))


def _lines_of(path: Location) -> Iterator[str]:
    with path.open() as handle:
        yield from handle


def _owner(paths: BatchPaths) -> str | None:
    """The tenant a batch belongs to: its submission's owner (None: no tenant, e.g. not from the API)."""
    submission = load_submission(paths)
    return submission.owner if submission is not None else None
