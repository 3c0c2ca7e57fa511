"""When a batch will finish: estimated when it is created, and again whenever it is read while it runs.

The estimate is built from three things, each measured, never assumed:

- **The batch's work** (`measure_work`, at creation): its requests, an approximate prompt token count
  (UTF-8 bytes of the prompt text / 4: the time model does not use it) and the bound on its output
  tokens: each request's `max_completion_tokens` / `max_tokens` / `max_output_tokens` times its choices
  (`n`) and prompts, or the model's length less the prompt where a request sets none.
- **The model's history on this instance** (`model_history`): the last finished batches of the model, from
  the `batch_chunks` and `batch_results` materialisations: the engine's generation rate (output tokens
  over the union of their generation intervals, so batches that shared the engine count once), the
  share of the output bound they really generated (EOS comes before `max_tokens`), and the fixed costs
  around generation: from creation to the generation step (the shortest seen: a batch that did not
  wait), the step's own cost beyond generation (engine load or attach, release), and the merge after it.
- **What is queued before it**: every unfinished batch created earlier, with the output it still has to
  generate. Batches of one model share a warm engine host at once (`VBATCH_ENGINE_HOST_CLIENTS` > 1):
  the engine then serves them side by side, and this batch is done once the engine has generated its
  own tokens plus, of each batch ahead, as much as this one needs (processor sharing). Otherwise they
  run one after the other, and everything ahead comes first.

With no finished batch of the model on record, or a request whose output has no bound, the estimate is
null with the reason, never an invented number.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
from dagster import AssetKey, DagsterInstance
from pydantic import BaseModel, Field

from batch_pipeline.domain.batch_object import TERMINAL_STATUSES, Batch, CompletionEstimate
from batch_pipeline.domain.batches import (
    BatchRecordError,
    BatchSpec,
    load_record,
    load_spec,
    load_summary,
    save_record,
    valid_batch_id,
)
from batch_pipeline.domain.constants import BATCHES_PARTITIONS
from batch_pipeline.domain.input_file import raw_lines
from batch_pipeline.domain.records import EMBEDDINGS_URL
from batch_pipeline.domain.settings import Settings
from batch_pipeline.domain.status import ChunkStats, EndedRuns, derive_batch, read_many_facts
from resources.engine_host_client import read_host
from resources.storage import BatchPaths, BatchStorage, location

log = logging.getLogger(__name__)

# How many of the model's last finished batches the history averages.
HISTORY_BATCHES = 5
# How many materialisations of batch_chunks are looked through for them (all models together).
HISTORY_SCAN = 200
# Prompt text per token, for the approximate prompt count (English BPE tokenizers: 3.5-4.5).
BYTES_PER_TOKEN = 4


class BatchWork(BaseModel):
    """What a batch asks of the engine, from its input file."""

    requests: int = 0
    prompt_tokens: int = Field(default=0, description="Approximate: UTF-8 bytes of the prompt text / 4.")
    output_tokens_bound: int = Field(default=0, description="Sum over requests of max tokens x choices x prompts.")
    unbounded: int = Field(default=0, description="Requests with no max tokens and no known model length.")
    embeddings: int = 0


class EstimateRecord(BaseModel):
    """estimate.json: the batch's work and the estimate made when it was created."""

    work: BatchWork
    at_submit: CompletionEstimate


@dataclass(frozen=True)
class ModelHistory:
    """What the model's last finished batches on this instance measured."""

    batches: int
    tokens_per_second: float  # output tokens over the union of their generation intervals
    fill: float  # output tokens generated / output bound (1.0 when no batch had a recorded bound)
    before_step_seconds: float  # creation -> generation step start, shortest seen
    step_overhead_seconds: float  # the generation step beyond generation and engine load (median)
    load_seconds: float  # the longest engine load seen: what a batch pays when no warm engine has the model
    after_step_seconds: float  # generation step end -> results merged (median)


@dataclass(frozen=True)
class Ahead:
    """A batch queued or running before the one estimated."""

    batch_id: str
    model: str
    remaining_tokens: int | None  # None: its work is unknown (created before estimates existed)
    started: bool


# ---- the batch's work -------------------------------------------------------------------------------


def _text_bytes(value: object) -> int:
    """UTF-8 bytes of the text in a prompt value (strings, message lists, content parts); token ids count 4."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, int):
        return BYTES_PER_TOKEN
    if isinstance(value, list):
        return sum(_text_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_text_bytes(value.get(key)) for key in ("content", "text", "input", "instructions")
                   if key in value)
    return 0


def _prompts(body: dict) -> int:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def measure_work(path: Path, max_line_bytes: int, model_len: int | None) -> BatchWork:
    """The work of a batch file (one quick pass; each line is validated later, by batch_input)."""
    work = BatchWork()
    for _, raw in raw_lines(path, max_line_bytes):
        if raw is None or not raw.strip():
            continue
        try:
            line = msgspec.json.decode(raw)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            continue  # an invalid line does no work
        body = line.get("body") if isinstance(line, dict) else None
        if not isinstance(body, dict):
            continue
        work.requests += 1
        if line.get("url") == EMBEDDINGS_URL:
            work.embeddings += 1
            work.prompt_tokens += math.ceil(_text_bytes(body.get("input")) / BYTES_PER_TOKEN)
            continue
        prompt = math.ceil(sum(_text_bytes(body.get(key)) for key in ("messages", "prompt", "input", "instructions"))
                           / BYTES_PER_TOKEN)
        work.prompt_tokens += prompt
        most = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
        if not isinstance(most, int):
            if model_len is None:
                work.unbounded += 1
                continue
            most = max(model_len - prompt, 1)
        choices = body.get("n")
        work.output_tokens_bound += most * (choices if isinstance(choices, int) and choices > 1 else 1) * _prompts(body)
    return work


def model_length(model: str, max_model_len: int | None) -> int | None:
    """The engine's context length: VBATCH_MAX_MODEL_LEN, else a local model's config.json, else unknown."""
    if max_model_len:
        return max_model_len
    try:
        config = msgspec.json.decode((Path(model) / "config.json").read_bytes())
    except (OSError, msgspec.DecodeError):
        return None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return value if isinstance(value, int) else None


def save_estimate(paths: BatchPaths, record: EstimateRecord) -> None:
    """Write estimate.json atomically."""
    save_record(paths.estimate, record)


def load_estimate(paths: BatchPaths) -> EstimateRecord | None:
    """estimate.json, None for a batch created before estimates existed (or if damaged: an estimate only)."""
    try:
        return load_record(EstimateRecord, paths.estimate)
    except BatchRecordError:
        return None


# ---- the model's history ----------------------------------------------------------------------------


def _union_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def model_histories(instance: DagsterInstance, storage: BatchStorage) -> dict[str, ModelHistory]:
    """Each model's history (keyed by what the engine loads, `BatchSpec.model`), from the instance's last
    materialisations of batch_chunks and batch_results (two queries)."""
    merged = {(r.partition_key, r.run_id): r.timestamp
              for r in instance.fetch_materializations(AssetKey("batch_results"), limit=HISTORY_SCAN).records}
    per_model: dict[str, list[tuple[BatchSpec, dict, float, float]]] = {}
    for record in instance.fetch_materializations(AssetKey("batch_chunks"), limit=HISTORY_SCAN).records:
        materialization = record.asset_materialization
        merged_at = merged.get((record.partition_key, record.run_id))
        if materialization is None or record.partition_key is None or merged_at is None:
            continue
        meta = {key: value.value for key, value in materialization.metadata.items()}
        if not meta.get("completion_tokens") or not meta.get("generation_seconds") or meta.get("chunks_resumed"):
            continue  # an embeddings batch, or a resumed one (its generation covers part of the batch)
        try:
            spec = load_spec(storage.batch(record.partition_key))
        except (OSError, ValueError):
            continue
        entries = per_model.setdefault(spec.model, [])
        if len(entries) < HISTORY_BATCHES:
            entries.append((spec, meta, record.timestamp, merged_at))
    return {model: _history(storage, entries) for model, entries in per_model.items()}


def _history(storage: BatchStorage, entries: Sequence[tuple[BatchSpec, dict, float, float]]) -> ModelHistory:
    intervals, befores, overheads, afters, loads = [], [], [], [], []
    tokens = bounded_tokens = bound = 0
    for spec, meta, step_end, merged_at in entries:
        generation_end = step_end - float(meta.get("engine_release_seconds") or 0.0)
        intervals.append((generation_end - meta["generation_seconds"], generation_end))
        befores.append(max(step_end - float(meta.get("step_seconds") or 0.0) - spec.created_at, 0.0))
        loads.append(float(meta.get("engine_load_seconds") or 0.0))
        overheads.append(max(float(meta.get("step_seconds") or 0.0) - meta["generation_seconds"] - loads[-1], 0.0))
        afters.append(max(merged_at - step_end, 0.0))
        tokens += meta["completion_tokens"]
        paths = storage.batch(spec.batch_id)
        recorded = load_estimate(paths)
        summary = _summary(paths)
        if recorded is not None and recorded.work.output_tokens_bound and not recorded.work.unbounded and summary:
            bounded_tokens += summary
            bound += recorded.work.output_tokens_bound
    return ModelHistory(batches=len(entries), tokens_per_second=tokens / max(_union_seconds(intervals), 1e-6),
                        fill=min(bounded_tokens / bound, 1.0) if bound else 1.0, before_step_seconds=min(befores),
                        step_overhead_seconds=statistics.median(overheads), load_seconds=max(loads),
                        after_step_seconds=statistics.median(afters))


def _summary(paths: BatchPaths) -> int:
    try:
        summary = load_summary(paths)
    except BatchRecordError:
        return 0
    return summary.completion_tokens if summary is not None else 0


# ---- the estimate ----------------------------------------------------------------------------------


def expected_output(work: BatchWork, history: ModelHistory) -> int:
    """The output tokens the batch is expected to generate: its bound, scaled by what the model's
    batches really generated of theirs."""
    return round(work.output_tokens_bound * history.fill)


def estimate(now: float, work: BatchWork | None, done_tokens: int, started: bool, history: ModelHistory | None,
             ahead: Sequence[Ahead], histories: dict[str, ModelHistory], shared: bool,
             engine_warm: bool = False) -> CompletionEstimate:
    """When a batch with `work` (of which `done_tokens` are generated) finishes, after `ahead`; `engine_warm`:
    an engine with its model is loaded already (the warm host), or a batch ahead of the same model loads it."""
    made = CompletionEstimate(estimated_at=int(now))
    if work is None:
        made.reason = "the batch's work was not measured (it was created before estimates existed)"
        return made
    if work.embeddings:
        made.reason = "estimates cover generative batches; this one has embeddings requests"
        return made
    if work.unbounded:
        made.reason = (f"{work.unbounded} requests set no max_tokens and the model's length is unknown "
                       "(set VBATCH_MAX_MODEL_LEN)")
        return made
    if history is None:
        made.reason = "no finished batch of this model on this instance yet: its tokens/s is unknown"
        return made
    own = max(expected_output(work, history) - done_tokens, 0) / history.tokens_per_second
    waits = []
    for batch in ahead:
        rate = histories.get(batch.model)
        if batch.remaining_tokens is None or rate is None:
            made.reason = f"batch {batch.batch_id}, queued before this one, has no estimate of its own"
            return made
        waits.append((batch.remaining_tokens / rate.tokens_per_second,
                      0.0 if batch.started else rate.step_overhead_seconds))
    if shared:  # side by side on one engine: each batch ahead delays this one by at most its own time
        engine = own + sum(min(seconds, own) for seconds, _ in waits)
        before = 0.0 if started else history.before_step_seconds
    else:  # one after the other: the whole queue ahead, each with its own step overhead
        engine = own
        before = max(0.0 if started else history.before_step_seconds, sum(s + o for s, o in waits))
    step = 0.0 if started else history.step_overhead_seconds + (0.0 if engine_warm else history.load_seconds)
    made.expected_completed_at = int(now + before + step + engine + history.after_step_seconds)
    made.tokens_per_second = round(history.tokens_per_second, 1)
    made.expected_output_tokens = expected_output(work, history)
    made.queued_ahead = len(ahead)
    return made


def live_estimate(batch: Batch, spec: BatchSpec, recorded: EstimateRecord | None, done_tokens: int,
                  histories: dict[str, ModelHistory], ahead: Sequence[Ahead], shared: bool,
                  now: float) -> CompletionEstimate | None:
    """The Batch object's estimate as of now: the one made at creation until it runs, then recomputed
    from its progress; None for a batch that has ended (its `completed_at` says when)."""
    if recorded is None:
        return None
    if batch.status in TERMINAL_STATUSES:
        return recorded.at_submit.model_copy(update={
            "expected_completed_at": None, "estimated_at": None, "reason": f"the batch is {batch.status}",
            "at_submit": recorded.at_submit.expected_completed_at})
    if batch.status == "validating":
        return recorded.at_submit
    made = estimate(now, recorded.work, done_tokens, True, histories.get(spec.model), ahead, histories, shared)
    made.at_submit = recorded.at_submit.expected_completed_at
    return made


def remaining_tokens(recorded: EstimateRecord | None, done_tokens: int, history: ModelHistory | None) -> int | None:
    """Output tokens a queued or running batch still has to generate (None: unknown)."""
    if recorded is None or history is None or recorded.work.unbounded:
        return None
    return max(expected_output(recorded.work, history) - done_tokens, 0)


def at_submit(spec: BatchSpec, input_path: Path, max_line_bytes: int, max_model_len: int | None,
              histories: dict[str, ModelHistory], ahead: Sequence[Ahead], shared: bool,
              engine_warm: bool) -> EstimateRecord:
    """The batch's work and the estimate made when it is created (not yet written)."""
    work = measure_work(input_path, max_line_bytes, model_length(spec.model, max_model_len))
    made = estimate(spec.created_at, work, 0, False, histories.get(spec.model), ahead, histories, shared, engine_warm)
    made.at_submit = made.expected_completed_at
    return EstimateRecord(work=work, at_submit=made)


class Estimator:
    """Estimates for the batches of one instance and data folder: the API's and the CLI's service and the
    inbox sensor each hold one. The models' histories are read at most every HISTORY_TTL seconds."""

    HISTORY_TTL = 10.0

    def __init__(self, settings: Settings, instance: DagsterInstance, stats: ChunkStats | None = None,
                 ended: EndedRuns | None = None):
        self.settings = settings
        self.instance = instance
        self.data_dir = location(settings.data_root)
        self.storage = BatchStorage(data_dir=settings.data_root)
        self.stats = stats or ChunkStats()
        self.ended = ended or EndedRuns()
        # Batches of one model share the warm engine host at once; without it (or with one client) they queue.
        self.shared = settings.warm_engine and settings.engine_host_clients > 1
        self._histories: tuple[float, dict[str, ModelHistory]] | None = None

    def histories(self, fresh: bool = False) -> dict[str, ModelHistory]:
        """Each model's history, read again once HISTORY_TTL has passed (`fresh`: now)."""
        if fresh or self._histories is None or time.monotonic() - self._histories[0] > self.HISTORY_TTL:
            self._histories = (time.monotonic(), model_histories(self.instance, self.storage))
        return self._histories[1]

    def unfinished(self) -> list[tuple[BatchSpec, Batch, int]]:
        """(spec, Batch, output tokens so far) of every batch that has not ended, oldest first."""
        candidates = []
        for batch_id in self.instance.get_dynamic_partitions(BATCHES_PARTITIONS):
            paths = self.storage.batch(batch_id)
            if (valid_batch_id(batch_id) and paths.spec.is_file() and not paths.summary.exists()
                    and not paths.stopped.exists()):
                candidates.append(paths)
        found = []
        now = time.time()
        for facts in read_many_facts(self.instance, candidates, self.data_dir, self.stats, self.ended):
            batch = derive_batch(facts, now)
            if batch.status not in TERMINAL_STATUSES and not facts.spec.rejected:
                found.append((facts.spec, batch, facts.progress.completion_tokens if facts.progress else 0))
        return sorted(found, key=lambda item: item[0].created_at)

    def _ahead(self, spec: BatchSpec, unfinished: Sequence[tuple[BatchSpec, Batch, int]]) -> list[Ahead]:
        histories = self.histories()
        return [Ahead(other.batch_id, other.model,
                      remaining_tokens(load_estimate(self.storage.batch(other.batch_id)), done,
                                       histories.get(other.model)),
                      batch.status != "validating")
                for other, batch, done in unfinished
                if other.batch_id != spec.batch_id and other.created_at < spec.created_at]

    def engine_warm(self, model: str) -> bool:
        """Whether the warm engine host has `model` loaded now (slot 0's host; a batch then loads nothing)."""
        if not self.settings.warm_engine:
            return False
        host = read_host(self.settings.resolved_data_dir / "engines")
        return host is not None and host.get("kwargs", {}).get("model") == model

    def at_creation(self, spec: BatchSpec, input_path: Path) -> CompletionEstimate:
        """Measure a batch just registered, estimate it after what is queued before it, and keep both
        (estimate.json); returns the estimate."""
        try:
            ahead = self._ahead(spec, self.unfinished())
            # With the warm host, a batch of the same model ahead of this one loads the engine for it too;
            # without it, every run loads its own.
            warm = self.engine_warm(spec.model) or (self.settings.warm_engine and
                                                    any(batch.model == spec.model for batch in ahead))
            # The history read now: a batch that finished a moment ago is the history this one needs.
            record = at_submit(spec, input_path, self.settings.max_line_bytes, self.settings.max_model_len,
                               self.histories(fresh=True), ahead, self.shared, warm)
        except Exception as exc:  # an estimate only: the batch is taken in whatever happens here
            log.warning("could not estimate batch %s: %s", spec.batch_id, exc)
            record = EstimateRecord(work=BatchWork(), at_submit=CompletionEstimate(
                estimated_at=int(spec.created_at), reason=f"the estimate failed: {type(exc).__name__}"))
        save_estimate(self.storage.batch(spec.batch_id), record)
        return record.at_submit

    def for_batch(self, batch: Batch, spec: BatchSpec, done_tokens: int,
                  unfinished: Sequence[tuple[BatchSpec, Batch, int]] | None = None) -> CompletionEstimate | None:
        """The Batch object's `completion_estimate` as of now (`unfinished`: read once for a page of batches)."""
        recorded = load_estimate(self.storage.batch(spec.batch_id))
        if recorded is None or batch.status in TERMINAL_STATUSES or batch.status == "validating":
            return live_estimate(batch, spec, recorded, done_tokens, {}, [], self.shared, time.time())
        ahead = self._ahead(spec, self.unfinished() if unfinished is None else unfinished)
        return live_estimate(batch, spec, recorded, done_tokens, self.histories(), ahead, self.shared, time.time())
