"""A batch's status, derived each time it is read: never stored, never written while reading.

`read_facts` gathers what the Dagster instance says (the batch's latest run, found by its partition
tag, and that run's step events) and what the batch's files say (spec, submission, queue ticket,
manifest, finished chunks, summary or stopped counts). `derive_batch` is a pure function from those
facts to the OpenAI Batch object, so a batch launched from the UI, by a sensor, by `vllm-batch run`
or through the API is described exactly alike. Stopping a batch (cancel, expiry) is a separate,
explicit call: batch_pipeline/domain/stopping.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from dagster import DagsterEvent, DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

from batch_pipeline.domain.batch_object import Batch, BatchErrorItem, BatchErrors, InputTokensDetails, RequestCounts, Usage
from batch_pipeline.domain.batches import (
    BatchSpec,
    BatchSummary,
    Submission,
    load_manifest,
    load_spec,
    load_submission,
    load_summary,
)
from batch_pipeline.domain.constants import (
    ACTIVE_RUN_STATUSES,
    FAILURE_CODE_KEY,
    MAX_BATCH_ERRORS,
    NO_VALID_REQUESTS,
    PARTITION_TAG,
    RUN_KEY_TAG,
    WILL_RETRY_TAG,
)
from batch_pipeline.domain.intake import survey
from batch_pipeline.domain.queue_tickets import ticket_exists
from batch_pipeline.domain.records import CHAT_URL
from batch_pipeline.domain.results import ResultCounts, cached_tokens, read_chunk
from resources.storage import BatchPaths, Location, ParquetDamaged

CANCELING_STEP = "__canceling__"


@dataclass(frozen=True)
class RunState:
    """The batch's latest run of batch_job, as far as its status needs it."""

    run_id: str
    status: DagsterRunStatus
    ended_at: float | None
    step_starts: dict[str, float]  # step key -> first start; CANCELING_STEP -> when cancelling began
    failure: BatchErrorItem | None = None
    will_retry: bool = False  # a failed run the run-retry daemon is about to launch again

    @property
    def failed_for_good(self) -> bool:
        return self.status == DagsterRunStatus.FAILURE and not self.will_retry

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_RUN_STATUSES


@dataclass(frozen=True)
class BatchFacts:
    """Everything a batch's status is derived from."""

    spec: BatchSpec
    submission: Submission | None
    run: RunState | None
    ticket_pending: bool  # queued, and the sensor has not launched its run yet
    summary: BatchSummary | None  # results/summary.json: the batch finished
    stopped: dict | None  # results/stopped.json: the batch was stopped and its partial results written
    progress: ResultCounts | None  # counts so far, from the manifest and the finished chunks
    summary_mtime: float | None = None
    submission_mtime: float | None = None
    line_errors: tuple[BatchErrorItem, ...] = ()  # a batch failed because no line was valid: each line's error

    @property
    def finished(self) -> bool:
        """The batch reached an end of its own: results written, or its run failed or was cancelled."""
        if self.run is not None and (self.run.active or self.run.will_retry):
            return False
        if self.run is None and self.submission is not None and self.submission.launch_error:
            return True
        return (self.summary is not None or (self.run is not None and self.run.status in
                                             (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)))


def stop_reason(facts: BatchFacts, now: float) -> str | None:
    """Why the batch is (being) stopped early: 'cancelled', 'expired', or None."""
    sub = facts.submission
    if sub is not None and sub.cancel_requested_at:
        return "cancelled"
    if sub is not None and sub.expired_at:
        return "expired"
    if sub is not None and sub.expires_at is not None and now > sub.expires_at and not facts.finished:
        return "expired"
    run = facts.run
    if run is not None and run.status == DagsterRunStatus.CANCELED and facts.summary is None:
        return "cancelled"  # from the UI or by run monitoring: kept alike to an API cancel
    return None


def derive_batch(facts: BatchFacts, now: float) -> Batch:
    """The Batch object for these facts (file ids are the caller's: they belong to the file store)."""
    spec, sub, run = facts.spec, facts.submission or Submission(), facts.run
    steps = run.step_starts if run is not None else {}
    batch = Batch(
        id=spec.batch_id, endpoint=sub.endpoint if facts.submission else _endpoint_of(spec),
        model=spec.model_name, input_file_id=sub.input_file_id or "",
        completion_window=sub.completion_window or "24h", status="validating", created_at=int(spec.created_at),
        expires_at=_int(sub.expires_at), in_progress_at=_int(steps.get("batch_chunks")),
        finalizing_at=_int(steps.get("batch_results")), metadata=spec.metadata or None,
    )
    reason = stop_reason(facts, now)
    if reason == "cancelled" and sub.cancel_requested_at:
        batch.cancelling_at = int(sub.cancel_requested_at)
        batch.status = "cancelled" if facts.stopped is not None else "cancelling"
        batch.cancelled_at = _int(sub.stopped_at)
    elif reason == "cancelled":
        assert run is not None
        batch.status, batch.cancelled_at = "cancelled", _int(run.ended_at)
        batch.cancelling_at = _int(steps.get(CANCELING_STEP))
    elif reason == "expired":
        batch.expired_at = int(sub.expired_at or sub.expires_at or now)
        batch.status = "expired" if facts.stopped is not None else "finalizing"
    elif run is not None and run.active:
        if run.status == DagsterRunStatus.CANCELING:
            batch.status, batch.cancelling_at = "cancelling", _int(steps.get(CANCELING_STEP)) or int(now)
        elif "batch_results" in steps:
            batch.status = "finalizing"
        elif "batch_chunks" in steps:
            batch.status = "in_progress"
    elif facts.ticket_pending:
        batch.status = "validating"
    elif sub.launch_error and run is None:
        batch.status, batch.failed_at = "failed", int(facts.submission_mtime or now)
        batch.errors = BatchErrors(data=[BatchErrorItem(code="batch_not_launched", message=sub.launch_error)])
    elif run is not None and run.status == DagsterRunStatus.FAILURE and run.will_retry:
        batch.status = "in_progress"  # the retry resumes from the finished chunks
    elif run is not None and run.failed_for_good:
        batch.status, batch.failed_at = "failed", _int(run.ended_at)
        batch.errors = BatchErrors(data=list(facts.line_errors) or [run.failure or BatchErrorItem(code="batch_failed")])
    elif facts.summary is not None:
        batch.status = "completed"
        batch.completed_at = _int(run.ended_at if run else None) or _int(facts.summary_mtime)
        batch.finalizing_at = batch.finalizing_at or batch.completed_at
        batch.in_progress_at = batch.in_progress_at or int(spec.created_at)

    summary = facts.summary.model_dump() if facts.summary is not None else None
    totals = (summary if batch.status == "completed" else
              facts.stopped if batch.status in ("cancelled", "expired") else None)
    # .get: stopped counts written before a count existed (cached_tokens) read it as 0.
    counts = ResultCounts(**{k: totals.get(k, 0) for k in ResultCounts().as_dict()}) if totals else facts.progress
    if counts is not None:
        batch.request_counts = RequestCounts(total=counts.total, completed=counts.completed, failed=counts.failed)
        batch.usage = Usage(input_tokens=counts.prompt_tokens, output_tokens=counts.completion_tokens,
                            input_tokens_details=InputTokensDetails(cached_tokens=counts.cached_tokens),
                            total_tokens=counts.prompt_tokens + counts.completion_tokens)
        batch.requests_from_cache = counts.from_cache
    return batch


def _endpoint_of(spec: BatchSpec) -> str:
    # A batch started outside the API (UI, sensor, `vllm-batch run`): its first lines say which endpoint.
    try:
        return survey(Path(spec.input_path), 1 << 20, max_lines=100).first_url or CHAT_URL
    except OSError:
        return CHAT_URL


def _int(value: float | None) -> int | None:
    return int(value) if value is not None else None


# ---- reading the facts ---------------------------------------------------------------------------


class ChunkStats:
    """Per-chunk counts for progress, read once per chunk file (a finished chunk never changes)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], ResultCounts] = {}

    def progress(self, paths: BatchPaths) -> ResultCounts | None:
        """Counts so far: every line batch_input rejected, plus the finished chunks' rows."""
        manifest = load_manifest(paths)
        if manifest is None:
            return None
        counts = ResultCounts(total=manifest.valid_requests + manifest.invalid_lines, failed=manifest.invalid_lines)
        for index in sorted(paths.finished_chunks() & set(range(manifest.num_chunks))):
            chunk = self._chunk(paths.chunk(index))
            if chunk is not None:
                counts.completed += chunk.completed
                counts.failed += chunk.failed
                counts.prompt_tokens += chunk.prompt_tokens
                counts.completion_tokens += chunk.completion_tokens
                counts.cached_tokens += chunk.cached_tokens
                counts.from_cache += chunk.from_cache
        return counts

    def _chunk(self, path: Location) -> ResultCounts | None:
        try:
            key = (str(path), path.stat().st_mtime_ns)
        except FileNotFoundError:
            return None
        if key not in self._cache:
            try:
                table = read_chunk(path, columns=["response", "error", "prompt_tokens", "completion_tokens",
                                                  "from_cache"])
            except (FileNotFoundError, ParquetDamaged):  # gone, or damaged: the run redoes it, not counted yet
                return None
            failed = table.num_rows - table["error"].null_count
            self._cache[key] = ResultCounts(
                total=table.num_rows, completed=table.num_rows - failed, failed=failed,
                prompt_tokens=_sum(table["prompt_tokens"]), completion_tokens=_sum(table["completion_tokens"]),
                cached_tokens=cached_tokens(table["response"]), from_cache=_sum(table["from_cache"]))
        return self._cache[key]


def _sum(column: pa.ChunkedArray) -> int:
    return pc.sum(column).as_py() or 0


ENDED_RUN_STATUSES = frozenset({DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED})
_END_EVENTS = {DagsterEventType.RUN_SUCCESS, DagsterEventType.RUN_FAILURE, DagsterEventType.RUN_CANCELED}
_RUN_EVENTS = {DagsterEventType.STEP_START, DagsterEventType.RUN_CANCELING, DagsterEventType.STEP_FAILURE, *_END_EVENTS}


@dataclass(frozen=True)
class RunEvents:
    """What a run's events say, as far as its batch's status needs it."""

    step_starts: dict[str, float]  # step key -> first start; CANCELING_STEP -> when cancelling began
    failure: BatchErrorItem | None  # the first step failure of a failed run
    ended_at: float | None  # the run's end event (Dagster's run record takes its end time from it)


class EndedRuns:
    """The events of each run that has ended, read once: an ended run gets no more events."""

    def __init__(self) -> None:
        self._events: dict[str, RunEvents] = {}

    def events(self, instance: DagsterInstance, run: DagsterRun) -> RunEvents:
        """The run's events, read now unless it had ended when they were last read."""
        if run.run_id in self._events:
            return self._events[run.run_id]
        read = run_events(instance, run)
        if run.status in ENDED_RUN_STATUSES:  # its end event is stored before its status changes
            self._events[run.run_id] = read
        return read


def run_events(instance: DagsterInstance, run: DagsterRun) -> RunEvents:
    """A run's step starts, failure and end, from its events (one query)."""
    starts: dict[str, float] = {}
    failures: list[DagsterEvent] = []
    ended_at = None
    for entry in instance.all_logs(run.run_id, of_type=_RUN_EVENTS):
        event = entry.dagster_event
        if event is not None and event.event_type == DagsterEventType.STEP_FAILURE:
            failures.append(event)
        elif event is not None and event.event_type in _END_EVENTS:
            ended_at = entry.timestamp
        else:
            starts.setdefault(entry.step_key or CANCELING_STEP, entry.timestamp)
    failure = None
    if run.status == DagsterRunStatus.FAILURE:
        step = failures[0].step_key if failures else None
        code = failure_code(failures) or ("invalid_file" if step == "batch_input" else "batch_failed")
        failure = BatchErrorItem(code=code, message=failure_message(failures))
    return RunEvents(starts, failure, ended_at if run.status in ENDED_RUN_STATUSES else None)


def latest_runs(instance: DagsterInstance, batch_ids: Sequence[str],
                ended: EndedRuns | None = None) -> dict[str, RunState]:
    """Each batch's latest run, with one query for all of them (every run of batch_job carries its
    partition tag, however launched); batches without a run are left out.

    `get_runs`, not `get_run_records`: on PostgreSQL every `get_run_records` call also inspects the
    runs table's columns (a catalog query on a connection of its own), which was most of the time
    the API server spent describing a batch.
    """
    if not batch_ids:
        return {}
    ended = ended or EndedRuns()
    latest: dict[str, RunState] = {}
    # Newest first, as Dagster orders runs: the first run seen of a partition is its latest.
    for run in instance.get_runs(RunsFilter(tags={PARTITION_TAG: list(batch_ids)})):
        batch_id = run.tags.get(PARTITION_TAG)
        if batch_id is None or batch_id in latest:
            continue
        events = ended.events(instance, run)
        latest[batch_id] = RunState(run.run_id, run.status, events.ended_at, events.step_starts, events.failure,
                                    may_retry(instance, run, events.ended_at))
    return latest


# Dagster stores a run's failure first and tags it `dagster/will_retry` a moment later (the event
# handler, or the run-retry daemon for a run that lacks the tag). In between, the failed run is not
# yet known to be final: read as failed, a batch whose killed worker was about to be retried showed
# `failed` for one poll and `in_progress` again after.
UNTAGGED_FAILURE_GRACE_S = 120.0


def may_retry(instance: DagsterInstance, run: DagsterRun, ended_at: float | None) -> bool:
    """Whether a failed run may still be retried: tagged so, or failed too recently for the tag to be there."""
    tag = run.tags.get(WILL_RETRY_TAG)
    if tag is not None or run.status != DagsterRunStatus.FAILURE:
        return tag == "true"
    if not instance.run_retries_enabled:
        return False
    return ended_at is not None and time.time() - ended_at < UNTAGGED_FAILURE_GRACE_S


def read_facts(instance: DagsterInstance, paths: BatchPaths, data_dir: Location, stats: ChunkStats,
               ended: EndedRuns | None = None) -> BatchFacts:
    """What the instance and the files say about one batch, now."""
    return read_many_facts(instance, [paths], data_dir, stats, ended)[0]


def read_many_facts(instance: DagsterInstance, batches: Sequence[BatchPaths], data_dir: Location,
                    stats: ChunkStats, ended: EndedRuns | None = None) -> list[BatchFacts]:
    """What the instance and the files say about each of `batches`, now: one query for all their runs
    and one for their queue tickets, whatever their number (a page of `GET /v1/batches` reads 20 at once)."""
    specs = [load_spec(paths) for paths in batches]
    submissions = [load_submission(paths) for paths in batches]
    runs = latest_runs(instance, [spec.batch_id for spec in specs], ended)
    # The sensor clears a ticket once its run exists; until then the ticket may have a run already.
    waiting = [sub.ticket for sub in submissions
               if sub is not None and sub.ticket and ticket_exists(data_dir, sub.ticket)]
    launched = set()
    if waiting:
        launched = {run.tags.get(RUN_KEY_TAG) for run in instance.get_runs(RunsFilter(tags={RUN_KEY_TAG: waiting}))}
    facts = []
    for paths, spec, submission in zip(batches, specs, submissions, strict=True):
        run = runs.get(spec.batch_id)
        pending = submission is not None and submission.ticket in waiting and submission.ticket not in launched
        summary = load_summary(paths)
        line_errors: tuple[BatchErrorItem, ...] = ()
        if (run is not None and run.failed_for_good and run.failure is not None
                and run.failure.code == NO_VALID_REQUESTS):
            line_errors = tuple(_line_errors(paths, MAX_BATCH_ERRORS))
        facts.append(BatchFacts(
            spec=spec, submission=submission, run=run, ticket_pending=pending, summary=summary,
            stopped=_json_or_none(paths.stopped), progress=stats.progress(paths),
            summary_mtime=paths.summary.stat().st_mtime if summary is not None else None,
            submission_mtime=paths.submission.stat().st_mtime if submission is not None else None,
            line_errors=line_errors))
    return facts


def _line_errors(paths: BatchPaths, limit: int) -> list[BatchErrorItem]:
    """The first `limit` line errors batch_input recorded, as items of the Batch object's `errors`."""
    items: list[BatchErrorItem] = []
    try:
        with paths.invalid.open() as handle:
            for text in handle:
                if len(items) >= limit:
                    break
                error = json.loads(text)["error"]
                items.append(BatchErrorItem(code=error.get("code"), message=error.get("message"),
                                            line=error.get("line"), param=error.get("param")))
    except FileNotFoundError:
        pass
    return items


def _json_or_none(path: Location) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def failure_code(events: Sequence[DagsterEvent]) -> str | None:
    """The error code a step failure carries in its metadata (batch_input's whole-file failures), if any."""
    for event in events:
        if event.is_step_failure:
            data = event.step_failure_data.user_failure_data
            value = data.metadata.get(FAILURE_CODE_KEY) if data is not None and data.metadata else None
            if value is not None:
                return str(getattr(value, "value", value))
    return None


def failure_message(events: Sequence[DagsterEvent]) -> str:
    """The first step failure of a run, as one line."""
    for event in events:
        if event.is_step_failure:
            data = event.step_failure_data
            if data.user_failure_data and data.user_failure_data.description:
                return data.user_failure_data.description
            error = data.error
            while error is not None and error.cause is not None:
                error = error.cause
            if error is not None:
                return error.message.strip().splitlines()[-1]
    return "the run failed; see the Dagster UI for its logs"
