"""Batch metrics derived from the Dagster instance: the event log of every batch_job run, tailed.

Why from the instance rather than from the run workers: a run worker is a short-lived process that
may be SIGKILLed at any moment, and nothing it does for monitoring may slow or fail a batch. The
core already records everything the metrics need (run status changes, the step start of
`batch_chunks` once it holds the `gpu` pool, one observation per written chunk, the materialization
metadata) and the chunk files on disk hold the per-request tokens and error codes. So the
long-lived process reads those, after the fact, and the run workers do nothing extra at all.

Counters start at zero when the exporter starts (runs that ended before are not replayed);
Prometheus' rate() and increase() treat that as a counter reset.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

from batch_pipeline.domain.batches import load_manifest
from integrations.monitoring.metrics import BatchMetrics
from resources.storage import BatchStorage

log = logging.getLogger(__name__)

BATCH_JOB = "batch_job"
PARTITION_TAG = "dagster/partition"
EVENT_TYPES = {
    DagsterEventType.STEP_START,
    DagsterEventType.STEP_FAILURE,
    DagsterEventType.ASSET_OBSERVATION,
    DagsterEventType.ASSET_MATERIALIZATION,
}
WAITING = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING]
ENDED = {DagsterRunStatus.SUCCESS: "completed", DagsterRunStatus.FAILURE: "failed",
         DagsterRunStatus.CANCELED: "cancelled"}
# EngineLoadError's message (resources/vllm_engine.py) is how a failed load reads in the event log.
ENGINE_LOAD_FAILURE = "could not load model"


@dataclass
class _RunState:
    run_id: str
    batch_id: str
    created: float
    cursor: str | None = None
    generating: bool = False  # batch_chunks started: it holds the gpu pool
    last_chunk_at: float | None = None
    done_chunks: set[int] = field(default_factory=set)


class BatchEventFollower:
    """Tails the instance's batch_job runs and turns their events into BatchMetrics; call poll() periodically."""

    def __init__(self, instance: DagsterInstance, data_dir: Path, metrics: BatchMetrics):
        self.instance = instance
        self.storage = BatchStorage(data_dir=str(data_dir))
        self.queue_dir = data_dir / "queue"  # where the API and the inbox leave tickets for the daemon
        self.metrics = metrics
        self.runs: dict[str, _RunState] = {}
        self.ended: dict[str, float] = {}
        self._models: dict[str, str] = {}
        self._last_loaded_model: str | None = None
        self._since = time.time()
        self._first_poll = True

    # ---- polling ---------------------------------------------------------------------------------

    def poll(self) -> None:
        """Read what happened since the last poll; never raises (errors are counted and logged)."""
        try:
            self._poll()
            self.metrics.exporter_poll.set(time.time())
        except Exception as exc:  # monitoring must keep serving whatever the instance does
            self.metrics.exporter_errors.inc()
            log.warning("monitoring: reading the Dagster instance failed: %s: %s", type(exc).__name__, exc)

    def _poll(self) -> None:
        started = time.time()
        if self._first_poll:
            # Runs already in progress when the exporter starts; earlier, finished runs are not replayed.
            records = self.instance.get_run_records(RunsFilter(
                job_name=BATCH_JOB, statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING, *WAITING]))
        else:
            # A status change updates the run record, so every run that started or ended shows here.
            since = datetime.fromtimestamp(self._since - 5, tz=timezone.utc)
            records = self.instance.get_run_records(RunsFilter(job_name=BATCH_JOB, updated_after=since))
        latest = {record.dagster_run.run_id: record for record in records}
        for run_id, record in latest.items():
            run = record.dagster_run
            if run_id in self.runs or run_id in self.ended or run.status in WAITING:
                continue
            batch_id = run.tags.get(PARTITION_TAG)
            if batch_id is None:
                continue
            self.runs[run_id] = _RunState(run_id, batch_id, record.create_timestamp.timestamp())
            self._zero_series(self._model(batch_id))
        for state in list(self.runs.values()):
            self._follow(state, latest.get(state.run_id))
        self._first_poll = False
        self._since = started
        self._update_queue_depth()
        for run_id, ended_at in list(self.ended.items()):  # forget ended runs once no poll can return them
            if ended_at < started - 3600:
                del self.ended[run_id]

    def _follow(self, state: _RunState, record) -> None:
        # The record was read before the events: if it says the run ended, the events read now are all of them.
        connection = self.instance.get_records_for_run(state.run_id, cursor=state.cursor, of_type=EVENT_TYPES)
        for event_record in connection.records:
            self._on_event(state, event_record.event_log_entry)
        state.cursor = connection.cursor
        if connection.has_more:
            return
        if record is not None and record.dagster_run.status in ENDED:
            self._on_run_end(state, record)

    # ---- events ------------------------------------------------------------------------------------

    def _on_event(self, state: _RunState, entry) -> None:
        event = entry.dagster_event
        if event is None:
            return
        kind = event.event_type
        if kind == DagsterEventType.STEP_START and event.step_key == "batch_chunks":
            state.generating = True
            self.metrics.queue_wait.observe(max(0.0, entry.timestamp - state.created))
            self.metrics.batch_progress.labels(state.batch_id).set(entry.timestamp)
            self._set_progress(state)
        elif kind == DagsterEventType.STEP_FAILURE and event.step_key == "batch_chunks":
            data = event.step_failure_data
            text = " ".join(filter(None, [
                data.user_failure_data.description if data.user_failure_data else None,
                data.error.message if data.error else None]))
            if ENGINE_LOAD_FAILURE in text:
                self.metrics.engine_load_failures.labels(self._model(state.batch_id)).inc()
        elif kind == DagsterEventType.ASSET_OBSERVATION and _asset(event) == "batch_chunks":
            metadata = event.asset_observation_data.asset_observation.metadata
            if "chunk" in metadata:
                self._on_chunk(state, int(metadata["chunk"].value), entry.timestamp)
        elif kind == DagsterEventType.ASSET_MATERIALIZATION:
            metadata = event.step_materialization_data.materialization.metadata
            if _asset(event) == "batch_input":
                self._on_input(state)
            elif _asset(event) == "batch_chunks" and metadata.get("chunks_run") and metadata["chunks_run"].value:
                model = self._model(state.batch_id)
                self.metrics.engine_load.labels(model).observe(float(metadata["engine_load_seconds"].value))
                if self._last_loaded_model is not None and self._last_loaded_model != model:
                    self.metrics.engine_swaps.inc()
                self._last_loaded_model = model

    def _on_input(self, state: _RunState) -> None:
        paths = self.storage.batch(state.batch_id)
        model = self._model(state.batch_id)
        codes: Tally[str] = Tally()
        if paths.invalid.exists():
            with paths.invalid.open() as handle:
                for line in handle:
                    codes[json.loads(line)["error"].get("code", "unknown")] += 1
        self._count_failures(model, codes)

    def _on_chunk(self, state: _RunState, index: int, at: float) -> None:
        paths = self.storage.batch(state.batch_id)
        model = self._model(state.batch_id)
        table = pq.read_table(paths.chunk(index), columns=["error", "prompt_tokens", "completion_tokens"])
        errors = [json.loads(text) for text in table.column("error").to_pylist() if text is not None]
        self.metrics.requests.labels(model, "completed").inc(table.num_rows - len(errors))
        self._count_failures(model, Tally(error.get("code", "unknown") for error in errors))
        self.metrics.prompt_tokens.labels(model).inc(sum(v or 0 for v in table.column("prompt_tokens").to_pylist()))
        self.metrics.generation_tokens.labels(model).inc(
            sum(v or 0 for v in table.column("completion_tokens").to_pylist()))
        if state.last_chunk_at is not None:
            self.metrics.chunk_write.observe(max(0.0, at - state.last_chunk_at))
        state.last_chunk_at = at
        self.metrics.batch_progress.labels(state.batch_id).set(at)
        self._set_progress(state)

    def _count_failures(self, model: str, codes: Tally) -> None:
        if not codes:
            return
        self.metrics.requests.labels(model, "failed").inc(sum(codes.values()))
        for code, count in codes.items():
            self.metrics.request_errors.labels(model, code).inc(count)

    def _set_progress(self, state: _RunState) -> None:
        paths = self.storage.batch(state.batch_id)
        manifest = load_manifest(paths)
        if manifest is None:
            return
        valid, size = manifest.valid_requests, manifest.chunk_size
        finished = paths.finished_chunks() & set(range(manifest.num_chunks))
        done = manifest.invalid_lines + sum(min(size, valid - index * size) for index in finished)
        self.metrics.batch_requests.labels(state.batch_id, "total").set(valid + manifest.invalid_lines)
        self.metrics.batch_requests.labels(state.batch_id, "done").set(done)

    def _on_run_end(self, state: _RunState, record) -> None:
        run = record.dagster_run
        status = ENDED[run.status]
        if status == "cancelled" and self._expired(state.batch_id):
            status = "expired"
        model = self._model(state.batch_id)
        self.metrics.batches.labels(model, status).inc()
        if record.start_time and record.end_time:
            self.metrics.batch_duration.labels(model).observe(max(0.0, record.end_time - record.start_time))
        for labels in ((state.batch_id, "total"), (state.batch_id, "done")):
            _remove(self.metrics.batch_requests, *labels)
        _remove(self.metrics.batch_progress, state.batch_id)
        del self.runs[state.run_id]
        self.ended[state.run_id] = time.time()

    def _zero_series(self, model: str) -> None:
        # A series that first appears at 1 is invisible to increase() and rate(): Prometheus needs a
        # sample before the change. So a model's series exist, at 0, from its first run's start.
        for status in ("completed", "failed"):
            self.metrics.requests.labels(model, status)
        for status in ("completed", "failed", "cancelled", "expired"):
            self.metrics.batches.labels(model, status)
        self.metrics.engine_load_failures.labels(model)
        self.metrics.prompt_tokens.labels(model)
        self.metrics.generation_tokens.labels(model)

    # ---- what the files say ------------------------------------------------------------------------

    def _model(self, batch_id: str) -> str:
        if batch_id not in self._models:
            try:
                spec = json.loads(self.storage.batch(batch_id).spec.read_text())
                self._models[batch_id] = spec.get("model_name") or spec.get("model") or "unknown"
            except (OSError, ValueError):
                return "unknown"
        return self._models[batch_id]

    def _expired(self, batch_id: str) -> bool:
        # The Batch API stops a batch whose completion window closed by cancelling its run, and
        # records why in the batch's submission file.
        path = self.storage.batch(batch_id).root / "submission.json"
        try:
            return bool(json.loads(path.read_text()).get("expired_at"))
        except (OSError, ValueError):
            return False

    def _update_queue_depth(self) -> None:
        waiting_runs = self.instance.get_runs_count(RunsFilter(job_name=BATCH_JOB, statuses=WAITING))
        waiting_for_pool = sum(1 for state in self.runs.values() if not state.generating)
        tickets = len(list(self.queue_dir.glob("*.json"))) if self.queue_dir.is_dir() else 0
        self.metrics.queue_depth.set(waiting_runs + waiting_for_pool + tickets)


def _asset(event) -> str | None:
    key = event.asset_key
    return key.to_user_string() if key is not None else None


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass

