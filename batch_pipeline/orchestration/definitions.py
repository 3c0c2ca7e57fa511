"""The code location: the core pipeline merged with every enabled integration, assembled in one place."""

from __future__ import annotations

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    define_asset_job,
    in_process_executor,
)

from assets import batch_chunks, batch_input, batch_results
from batch_pipeline.domain.log_format import json_console_logger, json_logs_for_every_run
from batch_pipeline.domain.settings import Settings, get_settings
from batch_pipeline.orchestration.enabled_integrations import integration_definitions
from batch_pipeline.orchestration.schedules import build_catch_up_schedule
from batch_pipeline.orchestration.sensors import batch_stops, build_inbox_sensor, dead_run_workers, queued_batches
from resources.response_cache import ResponseCache
from resources.storage import BatchStorage
from resources.vllm_engine import VLLMEngine

CORE_ASSETS = AssetSelection.assets(batch_input, batch_chunks, batch_results)
# Everything the integrations add: downstream of batch_results, never part of batch_job.
INTEGRATION_ASSETS = AssetSelection.all() - CORE_ASSETS

# One process per run: the engine is loaded once in it and every chunk of the batch reuses it.
batch_job = define_asset_job(
    "batch_job",
    selection=CORE_ASSETS,
    executor_def=in_process_executor,
    description="Validate a batch file, generate every request with vLLM, merge the results.",
)
# What `vllm-batch run` executes after batch_job, and what the UI offers to re-run for one batch.
integrations_job = define_asset_job(
    "batch_integrations",
    selection=INTEGRATION_ASSETS,
    description="The enabled integrations' assets for one batch (they also run by themselves after batch_results).",
)


def build_resources(settings: Settings) -> dict:
    """The resources, configured from the settings object."""
    return {
        "storage": BatchStorage(data_dir=settings.data_root),
        "response_cache": ResponseCache(data_dir=settings.data_root, enabled=settings.response_cache,
                                        max_bytes=settings.response_cache_max_bytes),
        "engine": VLLMEngine(
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
            gpus=settings.gpus,
            engines_per_batch=settings.engines_per_batch,
            max_num_seqs=settings.max_num_seqs,
            enforce_eager=settings.enforce_eager,
            seed=settings.seed,
            engine_args=settings.engine_args,
            keep_loaded=settings.keep_engine_loaded,
            engine_host=settings.warm_engine,
            idle_seconds=settings.engine_idle_seconds,
            service_pid=settings.service_pid,
            compact_json=settings.compact_json,
            state_dir=str(settings.resolved_data_dir / "engines"),
        ),
    }


def build_definitions(settings: Settings) -> Definitions:
    """The Definitions for `settings`: the core, plus each enabled integration's own definitions."""
    core = Definitions(
        assets=[batch_input, batch_chunks, batch_results],
        jobs=[batch_job],
        sensors=[queued_batches, batch_stops, dead_run_workers, build_inbox_sensor(settings)],
        schedules=[build_catch_up_schedule(settings)],
        resources=build_resources(settings),
        # VBATCH_LOG_FORMAT=json: every run's `console` logger writes JSON lines (with run id, batch id, chunk).
        loggers={"console": json_console_logger} if settings.log_format == "json" else None,
    )
    if settings.log_format == "json":
        json_logs_for_every_run()
    integrations = integration_definitions(settings)
    if not any(integration.assets for integration in integrations):
        # No integration assets (none enabled, or only sensors such as webhooks): no job to run after a batch.
        return Definitions.merge(core, *integrations)
    automation = Definitions(
        jobs=[integrations_job],
        sensors=[AutomationConditionSensorDefinition(
            "integrations_after_results", target=INTEGRATION_ASSETS, default_status=DefaultSensorStatus.RUNNING,
            minimum_interval_seconds=10,
            description="Runs the integrations' assets of a batch once its batch_results partition is materialised.",
        )],
    )
    return Definitions.merge(core, automation, *integrations)


defs = build_definitions(get_settings())
