"""Stage 2: run the batch's requests through the vLLM engine, writing each finished chunk as parquet."""


import json
import logging
import os
import time

from dagster import AssetExecutionContext, AssetObservation, Failure, MaterializeResult, MetadataValue, asset
from dagster_postgres.utils import DagsterPostgresException
from sqlalchemy.exc import DBAPIError

from assets.batch_input import batch_input
from batch_pipeline.batches import BatchSpec, batches_partitions, load_spec
from batch_pipeline.chunks import ChunkReport, engine_args_for, run_chunks
from batch_pipeline.data_parallel import EngineWorker, run_chunks_data_parallel
from resources.device_slots import SlotLease
from resources.engine_processes import engine_process_facts
from resources.storage import BatchStorage
from resources.vllm_engine import EngineLoadError, VLLMEngine, engines_loaded, held_slot

log = logging.getLogger(__name__)
# What a write to the instance's database raises while the database restarts.
DATABASE_BLIPS = (DBAPIError, DagsterPostgresException)


def restart_engine(context: AssetExecutionContext, engine: VLLMEngine, model: str, engine_args: dict):
    """A new engine after the current one died mid-batch: the step goes on instead of failing."""
    context.log.warning("the engine died mid-batch; starting a new one (finished chunks are kept)")
    loaded = engine.restart(model, engine_args)
    context.log.info(f"new engine ready after {loaded.load_seconds:.1f}s")
    return loaded


@asset(
    partitions_def=batches_partitions,
    deps=[batch_input],
    pool="gpu",
    group_name="batch",
    kinds={"vllm", "parquet"},
)
def batch_chunks(context: AssetExecutionContext, storage: BatchStorage, engine: VLLMEngine) -> MaterializeResult:
    """The engine's outputs, one parquet file per chunk; finished chunks are kept and never redone."""
    paths = storage.batch(context.partition_key)
    spec = load_spec(paths)
    if not paths.manifest.exists():
        raise Failure("batch_input has not been materialised for this batch", allow_retries=False)
    manifest = json.loads(paths.manifest.read_text())
    chunk_size, num_chunks = manifest["chunk_size"], manifest["num_chunks"]
    finished_before = paths.finished_chunks() & set(range(num_chunks))
    todo = num_chunks - len(finished_before)
    if finished_before:
        context.log.info(f"resuming: {len(finished_before)} of {num_chunks} chunks are already finished")

    totals = {"requests": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0, "chunks": 0}
    load_seconds = release_seconds = 0.0
    started = time.perf_counter()

    def on_written(report: ChunkReport) -> None:
        totals["chunks"] += 1
        totals["requests"] += report.rows
        totals["failed"] += report.failed
        totals["prompt_tokens"] += report.prompt_tokens
        totals["completion_tokens"] += report.completion_tokens
        done = len(finished_before) + totals["chunks"]
        try:
            context.log_event(AssetObservation(
                asset_key=context.asset_key,
                partition=context.partition_key,
                metadata={"chunk": report.index, "rows": report.rows, "failed": report.failed,
                          "completion_tokens": report.completion_tokens, "chunks_done": done,
                          "chunks_total": num_chunks},
            ))
            context.log.info(f"chunk {report.index} written ({done}/{num_chunks} chunks, {report.rows} requests)",
                             extra={"chunk": report.index})
        except DATABASE_BLIPS as exc:
            # A progress report only: the chunk is safe on disk, and a database blip (e.g. a
            # PostgreSQL restart, which dagster-postgres reports as "too many retries for DB
            # connection") must not fail a batch that is generating fine. Not through context.log:
            # that writes to the same database.
            log.warning("could not record progress of chunk %s: %s", report.index, type(exc).__name__)

    generation_seconds = 0.0
    first_output: list[float] = []  # seconds from the step's start to the first finished request

    def on_first_output() -> None:
        first_output.append(time.perf_counter() - started)

    engines: list[dict] = []
    if todo:
        session_started = time.perf_counter()
        try:
            engine_args = engine_args_for(spec.engine_args, manifest.get("endpoints", {}))
            # Data parallel: more engine slots free right now than this step's own, and more than one chunk to run.
            most = min(engine.engines_per_batch or todo, todo) - 1
            extra = engine.extra_slots(most) if most > 0 and engine.data_parallel() else []
            data_parallel = bool(extra)
            if data_parallel:
                engines, load_seconds, generation_seconds = _run_data_parallel(
                    context, engine, [engine.hand_over_slot(), *extra], storage, spec, engine_args, manifest,
                    sorted(set(range(num_chunks)) - finished_before), on_written, on_first_output)
            else:
                with engine.session(spec.model, engine_args) as loaded:
                    load_seconds = loaded.load_seconds
                    slot = held_slot()
                    context.log.info(f"engine for {spec.model_name} ready after {load_seconds:.1f}s"
                                     + (f" on {slot.describe()}" if slot else ""))
                    if slot is not None:
                        engines = [{"slot": slot.index, "devices": list(slot.devices), "pid": os.getpid(),
                                    "load_seconds": round(load_seconds, 3),
                                    "engine_processes": engine_process_facts(list(slot.env))}]
                    generation_started = time.perf_counter()
                    run_chunks(loaded, paths, batch_id=spec.batch_id, model_name=spec.model_name,
                               chunk_size=chunk_size, total=manifest["valid_requests"], skip=finished_before,
                               on_written=on_written,
                               restart=lambda: restart_engine(context, engine, spec.model, engine_args),
                               on_first_output=on_first_output)
                    generation_seconds = time.perf_counter() - generation_started
                    for entry in engines:
                        entry["chunks"] = totals["chunks"]
        except EngineLoadError as exc:
            raise Failure(str(exc), allow_retries=False) from None
        if not engine.keep_loaded and not data_parallel:
            # What the session took beyond loading and generating: releasing the engine (and its GPU memory).
            release_seconds = max(time.perf_counter() - session_started - generation_seconds - load_seconds, 0.0)
            context.log.info(f"engine released after {release_seconds:.1f}s")
    missing = set(range(num_chunks)) - paths.finished_chunks()
    if missing:
        raise Failure(f"{len(missing)} chunks are missing after generation: {sorted(missing)[:10]}")
    tokens_per_second = totals["completion_tokens"] / generation_seconds if generation_seconds > 0 else 0.0
    return MaterializeResult(metadata={
        "chunks_total": num_chunks,
        "chunks_run": totals["chunks"],
        "chunks_resumed": len(finished_before),
        "requests_run": totals["requests"],
        "requests_failed": totals["failed"],
        "prompt_tokens": totals["prompt_tokens"],
        "completion_tokens": totals["completion_tokens"],
        "generation_seconds": round(generation_seconds, 3),
        "engine_load_seconds": round(load_seconds, 3),
        "engine_release_seconds": round(release_seconds, 3),
        "engines_loaded_in_process": engines_loaded(),
        "first_output_seconds": round(first_output[0], 3) if first_output else -1.0,
        "step_seconds": round(time.perf_counter() - started, 3),
        "completion_tokens_per_second": round(tokens_per_second, 1),
        "chunks_path": MetadataValue.path(str(paths.chunks_dir)),
        # Data parallel: one entry per engine (slot, devices, worker pid, load seconds, chunks written).
        "engines": MetadataValue.json(engines),
    })


def _run_data_parallel(context: AssetExecutionContext, engine: VLLMEngine, leases: list[SlotLease],
                       storage: BatchStorage, spec: BatchSpec, engine_args: dict, manifest: dict, todo: list[int],
                       on_written, on_first_output) -> tuple[list[dict], float, float]:
    """The batch's missing chunks shared by one engine per slot; returns (engines, load s, generation s)."""
    context.log.info(f"data parallel: {len(leases)} engines on " + ", ".join(lease.slot.describe() for lease in leases))
    started = time.perf_counter()
    first_ready: list[float] = []
    last_written = [started]

    def on_chunk(report: ChunkReport) -> None:
        last_written[0] = time.perf_counter()
        on_written(report)

    def on_ready(worker: EngineWorker) -> None:
        first_ready.append(time.perf_counter())
        context.log.info(f"engine on {worker.slot.describe()} ready after {worker.load_seconds:.1f}s")

    try:
        engines = run_chunks_data_parallel(
            engine, leases, storage, spec.batch_id, model=spec.model, engine_args=engine_args,
            model_name=spec.model_name, chunk_size=manifest["chunk_size"], total=manifest["valid_requests"],
            todo=todo, on_written=on_chunk, on_first_output=on_first_output, on_ready=on_ready)
    finally:
        for lease in leases:
            lease.release()
    for failed in (e for e in engines if e["error"]):
        context.log.warning(failed["error"])
    # The engines load at once, each in its worker; generation counts from the first one ready to the last
    # chunk written (the workers' engine shutdowns after it are not generation).
    ready = first_ready[0] if first_ready else started
    return engines, ready - started, max(last_written[0] - ready, 0.0)
