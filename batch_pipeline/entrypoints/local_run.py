"""Run one batch end to end in this process, on a given instance (the `vllm-batch run` path)."""

from __future__ import annotations

import itertools
import logging
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
from dagster import DagsterInstance, DagsterRunStatus, Field, InitLoggerContext, RunsFilter, logger

from batch_pipeline.domain.batches import BatchSpec, load_summary, valid_batch_id
from batch_pipeline.domain.constants import HOST_TAG, LOCAL_PID_STARTED_TAG, LOCAL_PID_TAG, SOURCE_TAG
from batch_pipeline.domain.input_file import BatchFileError, ValidRequest, scan_batch_file
from batch_pipeline.domain.intake import HEAD_LINES, IntakeError, checked_input, register, resolve_model
from batch_pipeline.domain.models import ServedModel
from batch_pipeline.domain.response_reuse import answers_all, engine_context
from batch_pipeline.domain.settings import Settings
from batch_pipeline.domain.status import failure_message
from resources.response_cache import ResponseCache
from resources.storage import BatchPaths, BatchStorage
from resources.vllm_engine import VLLMEngine


class BatchRunError(Exception):
    """The batch could not be run; the message is one readable line."""


@dataclass
class BatchRun:
    batch_id: str
    run_id: str
    success: bool
    paths: BatchPaths
    seconds: float
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    integration_error: str | None = None  # the enabled integrations failed; the batch itself is complete


def check_local_batch(settings: Settings, input_file: Path, model: str, model_name: str | None = None,
                      batch_id: str | None = None, engine_args: dict[str, Any] | None = None,
                      ) -> tuple[Path, ServedModel]:
    """The input file and served model of a `vllm-batch run`, or BatchRunError: what registration would
    refuse, checked without the instance, so that the engine can start loading before it opens.
    `engine_args` replaces the model's own per-model arguments (a replay gives the recorded ones)."""
    try:
        path = checked_input(input_file)
        served = resolve_model(settings, model, allow_hub_ids=True)
    except IntakeError as exc:
        raise BatchRunError(str(exc)) from None
    if batch_id is not None and not valid_batch_id(batch_id):
        raise BatchRunError(f"invalid batch id {batch_id!r}: use letters, digits, '_', '-' and '.'")
    if engine_args is not None:
        served = replace(served, engine_args=engine_args)
    return path, replace(served, name=model_name) if model_name else served


def register_local_batch(settings: Settings, instance: DagsterInstance, input_file: Path, model: str,
                         model_name: str | None = None, batch_id: str | None = None,
                         chunk_size: int | None = None, source: str = "cli", engine_args: dict[str, Any] | None = None,
                         metadata: dict[str, str] | None = None) -> BatchSpec:
    """Register a file for `vllm-batch run`: `model` is a served name, a local model folder or a hub id."""
    path, served = check_local_batch(settings, input_file, model, model_name, batch_id, engine_args)
    try:
        return register(settings, instance, path, served, source=source, batch_id=batch_id, chunk_size=chunk_size,
                        metadata=metadata)
    except IntakeError as exc:
        raise BatchRunError(str(exc)) from None


def _process_alive(pid: int, started: float) -> bool:
    # (pid, start time) identifies a process; a new process that reused the pid has another start time.
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.Error:
        return False


def reap_dead_local_runs(instance: DagsterInstance) -> list[str]:
    """Fail the in-process runs whose process died, and free their `gpu` pool slots.

    A run executed in-process (`vllm-batch run`) that is killed never reports its end, and no daemon
    watches it, so it would hold its pool slot forever and block every later run. Returns the run ids.
    """
    reaped = []
    records = instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.STARTING]))
    for record in records:
        run = record.dagster_run
        if LOCAL_PID_TAG not in run.tags or run.tags.get(HOST_TAG) != socket.gethostname():
            continue
        if _process_alive(int(run.tags[LOCAL_PID_TAG]), float(run.tags[LOCAL_PID_STARTED_TAG])):
            continue
        instance.report_run_failed(run, "the process running it (vllm-batch run) died")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        reaped.append(run.run_id)
    return reaped


def cache_answers_head(settings: Settings, engine: VLLMEngine, served: ServedModel, input_file: Path,
                       engine_args: dict[str, Any]) -> bool:
    """Whether the response cache answers every valid line of the file's head: then `vllm-batch run` does not
    prefetch an engine (batch_chunks loads one only if a later line needs it)."""
    cache = ResponseCache(data_dir=settings.data_root, enabled=settings.response_cache)
    if not cache.enabled:
        return False
    head = itertools.islice(scan_batch_file(input_file, None, settings.max_line_bytes), HEAD_LINES)
    context = engine_context(served.model, served.name, engine.engine_kwargs(served.model, engine_args))
    try:
        return answers_all(cache, context, ((line.url, line.body) for line in head if isinstance(line, ValidRequest)))
    except (OSError, ValueError, BatchFileError):  # an unreadable cache or file: load the engine as usual
        return False


def one_process(settings: Settings) -> Settings:
    """The settings of one batch run in this process: its engine loads here and ends with the process,
    leaving no warm host behind, unless VBATCH_ENGINE_HOST=true asks for the instance's warm host."""
    return settings.model_copy(update={"engine_host": False}) if settings.engine_host is None else settings


@logger(
    {"log_level": Field(str, is_required=False, default_value="WARNING"),
     "name": Field(str, is_required=False, default_value="dagster")},
    description="The run's own warnings as `warning: ...` lines on stderr; the rest to the command's log.",
)
def quiet_console_logger(init_context: InitLoggerContext) -> logging.Logger:
    """The `console` logger of a `vllm-batch run` without -v (batch_pipeline/entrypoints/quiet_console.py).

    The console gets what the assets say from the configured level up to warnings ("3 of 303 lines were
    rejected"), not Dagster's events nor its errors: a failed run's cause is the command's one `error:`
    line, not a step failure's stack trace. Everything goes to the original stderr: the command's log file.
    """
    config = init_context.logger_config
    run_logger = logging.Logger(config["name"], level=logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(config["log_level"].upper())
    console.addFilter(lambda record: record.levelno < logging.ERROR
                      and _dagster_meta(record).get("dagster_event") is None)
    console.setFormatter(_AssetLineFormatter())
    to_log = logging.StreamHandler(sys.__stderr__ or sys.stderr)
    to_log.setLevel(logging.INFO)
    to_log.setFormatter(logging.Formatter("%(asctime)s - dagster - %(levelname)s - %(message)s"))
    run_logger.addHandler(console)
    run_logger.addHandler(to_log)
    return run_logger


def _dagster_meta(record: logging.LogRecord) -> dict[str, Any]:
    return getattr(record, "dagster_meta", None) or {}


class _AssetLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {_dagster_meta(record).get('orig_message', record.getMessage())}"


def run_batch_in_process(settings: Settings, instance: DagsterInstance, batch_id: str, tags: dict | None = None,
                         log_level: str = "INFO", quiet: bool = False) -> BatchRun:
    """Execute batch_job for one partition in this process and collect the summary; `quiet`: its console logger
    shows the assets' own lines only (`quiet_console_logger`)."""
    from batch_pipeline.orchestration.definitions import build_definitions

    settings = one_process(settings)
    reap_dead_local_runs(instance)
    paths = BatchStorage(data_dir=settings.data_root).batch(batch_id)
    defs = build_definitions(settings)
    quiet_logs = quiet and settings.log_format == "text"  # JSON lines are for a log shipper: left as they are
    job = defs.resolve_job_def("batch_job")
    if quiet_logs:
        job = job.with_logger_defs({"console": quiet_console_logger})
    me = psutil.Process()
    run_tags = {SOURCE_TAG: "cli", **(tags or {}), HOST_TAG: socket.gethostname(),
                LOCAL_PID_TAG: str(me.pid), LOCAL_PID_STARTED_TAG: repr(me.create_time())}
    started = time.perf_counter()
    # The console shows the run's own messages (chunk progress, warnings); the event log keeps everything.
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    result = job.execute_in_process(instance=instance, partition_key=batch_id, raise_on_error=False, tags=run_tags,
                                    run_config=run_config)
    run = BatchRun(batch_id, result.run_id, result.success, paths, time.perf_counter() - started)
    if not result.success:
        run.error = failure_message(result.all_events)
        return run
    summary = load_summary(paths)
    if summary is None:  # batch_results, the run's last step, writes it: removed since, by someone else
        run.success, run.error = False, f"the run ended without writing {paths.summary}"
        return run
    run.summary = summary.model_dump()
    for event in result.all_events:
        if event.is_step_materialization and event.step_key == "batch_chunks":
            meta = event.step_materialization_data.materialization.metadata
            for key in ("generation_seconds", "engine_load_seconds", "completion_tokens_per_second",
                        "chunks_resumed", "chunks_run", "engines_loaded_in_process", "first_output_seconds", "engines",
                        "requests_from_cache", "cache_seconds"):
                run.summary[key] = meta[key].value
    if defs.get_repository_def().has_job("batch_integrations"):
        # The daemon runs them by automation after batch_results; in-process nobody else would.
        # A separate run, so a failing integration leaves the batch's run successful.
        integrations = defs.resolve_job_def("batch_integrations")
        if quiet_logs:
            integrations = integrations.with_logger_defs({"console": quiet_console_logger})
        follow_up = integrations.execute_in_process(
            instance=instance, partition_key=batch_id, raise_on_error=False, tags=run_tags, run_config=run_config)
        if not follow_up.success:
            run.integration_error = failure_message(follow_up.all_events)
    return run
