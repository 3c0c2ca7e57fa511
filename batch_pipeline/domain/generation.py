"""The generation step of a batch: its missing chunks through the engine, on one engine or several.

`batch_chunks` calls `generate_batch` and reports what it returns. The engine resource decides
whether the engine is loaded in this process, attached from the slot's warm host, or (more engine
slots free than this step's own) one engine per slot in worker processes (data parallel).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from batch_pipeline.domain.batches import BatchRecordError, BatchSpec, load_manifest, load_spec
from batch_pipeline.domain.chunks import ChunkJob, ChunkReport, drop_damaged_chunks, engine_args_for, run_chunks
from batch_pipeline.domain.data_parallel import EngineWorker, run_chunks_data_parallel
from batch_pipeline.domain.response_reuse import ResponseReuse, answer_whole_chunks, batch_uses_cache, engine_context
from resources.engine_processes import engine_process_facts
from resources.response_cache import ResponseCache
from resources.storage import BatchStorage
from resources.vllm_engine import VLLMEngine

log = logging.getLogger(__name__)

# A hook for tests only, never set in production: while the file this variable names exists, the step
# waits after each chunk it writes, so that a test can cancel or kill a batch half-way through however
# fast the engine is (the step stays interruptible: it sleeps in Python).
_TEST_HOLD_FILE = "VBATCH_TEST_HOLD_FILE"


def _test_hold() -> None:
    hold = os.environ.get(_TEST_HOLD_FILE)
    deadline = time.monotonic() + 600
    while hold and os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.2)


class BatchNotReady(Exception):
    """The batch's input stage has not been materialised (or its manifest is damaged): nothing to generate."""


class ChunksMissing(Exception):
    """Chunks are still missing after generation (an engine worker died): the run retry resumes them."""


@dataclass
class Generation:
    """What one generation step did: the asset's metadata."""

    chunks_total: int
    chunks_resumed: int
    chunks_run: int = 0
    requests_run: int = 0
    requests_failed: int = 0
    requests_from_cache: int = 0  # answered from the response cache, without the engine
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0
    # Answering whole chunks from the response cache before any engine (lookups during generation are in
    # generation_seconds).
    cache_seconds: float = 0.0
    engine_load_seconds: float = 0.0
    engine_release_seconds: float = 0.0
    engines_loaded_in_process: int = 0
    first_output_seconds: float = -1.0
    step_seconds: float = 0.0
    # One entry per engine (slot, devices, worker pid, load seconds, chunks written); empty on one device.
    engines: list[dict[str, Any]] = field(default_factory=list)

    def add(self, report: ChunkReport) -> None:
        self.chunks_run += 1
        self.requests_run += report.rows
        self.requests_failed += report.failed
        self.requests_from_cache += report.from_cache
        self.prompt_tokens += report.prompt_tokens
        self.completion_tokens += report.completion_tokens

    @property
    def chunks_done(self) -> int:
        return self.chunks_resumed + self.chunks_run

    def metadata(self) -> dict[str, Any]:
        """The step's metadata (seconds rounded to ms, tokens/s of generation)."""
        tokens_per_second = self.completion_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0
        facts = {name: round(value, 3) if isinstance(value, float) else value for name, value in vars(self).items()}
        return {**facts, "completion_tokens_per_second": round(tokens_per_second, 1)}


def generate_batch(engine: VLLMEngine, storage: BatchStorage, batch_id: str,
                   on_written: Callable[[ChunkReport, Generation], None], say: Callable[[str], None] = log.info,
                   warn: Callable[[str], None] = log.warning, cache: ResponseCache | None = None) -> Generation:
    """Run every chunk of the batch that is not finished yet; finished chunks are kept and never redone.

    With `cache` (on, and the batch not opted out) requests answered before are answered from it; chunks
    it answers entirely are written before any engine loads, so a batch it answers whole loads none.
    `on_written` hears of each chunk as it is written, `say` gets the step's few progress lines and `warn`
    one line per finished chunk found damaged (removed, and run again).
    EngineLoadError when the engine cannot load, BatchNotReady before the input stage, ChunksMissing
    when chunks are still missing at the end (the run retry resumes them).
    """
    started = time.perf_counter()
    paths = storage.batch(batch_id)
    spec = load_spec(paths)
    try:
        manifest = load_manifest(paths)
    except BatchRecordError as exc:
        raise BatchNotReady(f"{exc}: materialise batch_input again to rewrite it") from None
    if manifest is None:
        raise BatchNotReady("batch_input has not been materialised for this batch")
    num_chunks = manifest.num_chunks
    finished = drop_damaged_chunks(paths, paths.finished_chunks() & set(range(num_chunks)), manifest.chunk_size,
                                   manifest.valid_requests, warn)
    result = Generation(chunks_total=num_chunks, chunks_resumed=len(finished))
    todo = sorted(set(range(num_chunks)) - finished)
    if finished:
        say(f"resuming: {len(finished)} of {num_chunks} chunks are already finished")
    job = ChunkJob(paths, spec.batch_id, spec.model_name, manifest.chunk_size, manifest.valid_requests,
                   frozenset(finished))

    def written(report: ChunkReport) -> None:
        result.add(report)
        on_written(report, result)
        _test_hold()

    def first_output() -> None:
        if result.first_output_seconds < 0:
            result.first_output_seconds = time.perf_counter() - started

    engine_args = engine_args_for(spec.engine_args, manifest.endpoints)
    reuse = None
    if todo and cache is not None and batch_uses_cache(cache, spec.metadata):
        cache_started = time.perf_counter()
        context = engine_context(spec.model, spec.model_name, engine.engine_kwargs(spec.model, engine_args))
        answered = answer_whole_chunks(job, ResponseReuse(cache, context, spec.batch_id, manifest.chunk_size), written)
        result.cache_seconds = time.perf_counter() - cache_started
        if answered:
            say(f"response cache: {len(answered)} of {len(todo)} chunks answered without the engine")
        todo = [index for index in todo if index not in answered]
        job = replace(job, skip=job.skip | answered)
        reuse = ResponseReuse(cache, context, spec.batch_id, manifest.chunk_size)
    if todo:
        # Data parallel: more engine slots free right now than this step's own, and more than one chunk to run.
        most = min(engine.engines_per_batch or len(todo), len(todo)) - 1
        extra = engine.extra_slots(most) if most > 0 and engine.data_parallel() else []
        if extra:
            _on_several_engines(engine, [engine.hand_over_slot(), *extra], storage, spec, engine_args, job, todo,
                                written, first_output, say, result, reuse)
        else:
            _on_this_engine(engine, spec, engine_args, job, written, first_output, say, result, reuse)
    if reuse is not None and cache is not None:
        cache.evict()
    result.engines_loaded_in_process = engine.engines_loaded()
    missing = set(range(num_chunks)) - paths.finished_chunks()
    if missing:
        raise ChunksMissing(f"{len(missing)} chunks are missing after generation: {sorted(missing)[:10]}")
    result.step_seconds = time.perf_counter() - started
    return result


def _on_this_engine(engine: VLLMEngine, spec: BatchSpec, engine_args: dict, job: ChunkJob,
                    written: Callable[[ChunkReport], None], first_output: Callable[[], None],
                    say: Callable[[str], None], result: Generation, reuse: ResponseReuse | None) -> None:
    """The chunks on the process's engine (loaded here, or the slot's warm host), restarted if it dies."""
    session_started = time.perf_counter()

    def restart():
        say("the engine died mid-batch; starting a new one (finished chunks are kept)")
        loaded = engine.restart(spec.model, engine_args)
        say(f"new engine ready after {loaded.load_seconds:.1f}s")
        return loaded

    with engine.session(spec.model, engine_args) as loaded:
        result.engine_load_seconds = loaded.load_seconds
        slot = engine.held_slot()
        say(f"engine for {spec.model_name} ready after {loaded.load_seconds:.1f}s"
            + (f" on {slot.describe()}" if slot else ""))
        generation_started = time.perf_counter()
        run_chunks(loaded, job, written, restart=restart, on_first_output=first_output, responses=reuse)
        if reuse is not None:
            reuse.flush()
        result.generation_seconds = time.perf_counter() - generation_started
        if slot is not None:
            result.engines = [{"slot": slot.index, "devices": list(slot.devices), "pid": os.getpid(),
                               "load_seconds": round(loaded.load_seconds, 3), "chunks": result.chunks_run,
                               "engine_processes": engine_process_facts(list(slot.env))}]
    if not engine.keep_loaded:
        # What the session took beyond loading and generating: releasing the engine (and its GPU memory).
        result.engine_release_seconds = max(time.perf_counter() - session_started - result.generation_seconds
                                            - result.engine_load_seconds, 0.0)
        say(f"engine released after {result.engine_release_seconds:.1f}s")


def _on_several_engines(engine: VLLMEngine, leases: list, storage: BatchStorage, spec: BatchSpec,
                        engine_args: dict, job: ChunkJob, todo: list[int], written: Callable[[ChunkReport], None],
                        first_output: Callable[[], None], say: Callable[[str], None], result: Generation,
                        reuse: ResponseReuse | None) -> None:
    """The batch's missing chunks shared by one engine per slot (data parallel)."""
    say(f"data parallel: {len(leases)} engines on " + ", ".join(lease.slot.describe() for lease in leases))
    started = time.perf_counter()
    first_ready: list[float] = []
    last_written = [started]

    def on_chunk(report: ChunkReport) -> None:
        last_written[0] = time.perf_counter()
        written(report)

    def on_ready(worker: EngineWorker) -> None:
        first_ready.append(time.perf_counter())
        say(f"engine on {worker.slot.describe()} ready after {worker.load_seconds:.1f}s")

    try:
        result.engines = run_chunks_data_parallel(engine, leases, storage, job, model=spec.model,
                                                  engine_args=engine_args, todo=todo, on_written=on_chunk,
                                                  on_first_output=first_output, on_ready=on_ready, reuse=reuse)
    finally:
        for lease in leases:
            lease.release()
    for failed in (entry for entry in result.engines if entry["error"]):
        say(failed["error"])
    # The engines load at once, each in its worker; generation counts from the first one ready to the last
    # chunk written (the workers' engine shutdowns after it are not generation).
    ready = first_ready[0] if first_ready else started
    result.engine_load_seconds = ready - started
    result.generation_seconds = max(last_written[0] - ready, 0.0)
