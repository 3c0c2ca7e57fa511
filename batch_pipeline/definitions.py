"""The code location: every asset, job and resource, assembled in one place."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor

from assets import batch_chunks, batch_input, batch_results
from batch_pipeline.schedules import build_catch_up_schedule
from batch_pipeline.sensors import build_inbox_sensor, queued_batches
from batch_pipeline.settings import Settings, get_settings
from resources.storage import BatchStorage
from resources.vllm_engine import VLLMEngine

# One process per run: the engine is loaded once in it and every chunk of the batch reuses it.
batch_job = define_asset_job(
    "batch_job",
    selection=AssetSelection.assets(batch_input, batch_chunks, batch_results),
    executor_def=in_process_executor,
    description="Validate a batch file, generate every request with vLLM, merge the results.",
)


def build_resources(settings: Settings) -> dict:
    """The resources, configured from the settings object."""
    return {
        "storage": BatchStorage(data_dir=str(settings.resolved_data_dir)),
        "engine": VLLMEngine(
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
            max_num_seqs=settings.max_num_seqs,
            enforce_eager=settings.enforce_eager,
            seed=settings.seed,
            engine_args=settings.engine_args,
            keep_loaded=settings.keep_engine_loaded,
            compact_json=settings.compact_json,
            state_dir=str(settings.resolved_data_dir / "engines"),
        ),
    }


def build_definitions(settings: Settings) -> Definitions:
    """The Definitions for `settings`."""
    return Definitions(
        assets=[batch_input, batch_chunks, batch_results],
        jobs=[batch_job],
        sensors=[queued_batches, build_inbox_sensor(settings)],
        schedules=[build_catch_up_schedule(settings)],
        resources=build_resources(settings),
    )


defs = build_definitions(get_settings())
