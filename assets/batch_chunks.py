"""Stage 2: run the batch's requests through the vLLM engine, writing each finished chunk as parquet."""

import logging

from dagster import AssetExecutionContext, AssetObservation, Failure, MaterializeResult, MetadataValue, asset

from assets.batch_input import batch_input
from batch_pipeline.domain.batches import batches_partitions
from batch_pipeline.domain.chunks import ChunkReport
from batch_pipeline.domain.generation import BatchNotReady, ChunksMissing, Generation, generate_batch
from batch_pipeline.domain.instance import database_blip
from resources.engine_types import EngineLoadError
from resources.response_cache import ResponseCache
from resources.storage import BatchStorage, StorageError
from resources.vllm_engine import VLLMEngine

log = logging.getLogger(__name__)


@asset(partitions_def=batches_partitions, deps=[batch_input], pool="gpu", group_name="batch", kinds={"vllm", "parquet"})
def batch_chunks(context: AssetExecutionContext, storage: BatchStorage, engine: VLLMEngine,
                 response_cache: ResponseCache) -> MaterializeResult:
    """The engine's outputs, one parquet file per chunk; finished chunks are kept and never redone."""

    def progress(report: ChunkReport, step: Generation) -> None:
        done, total = step.chunks_done, step.chunks_total
        try:
            context.log_event(AssetObservation(asset_key=context.asset_key, partition=context.partition_key, metadata={
                "chunk": report.index, "rows": report.rows, "failed": report.failed, "chunks_done": done,
                "completion_tokens": report.completion_tokens, "from_cache": report.from_cache,
                "chunks_total": total}))
            context.log.info(f"chunk {report.index} written ({done}/{total} chunks, {report.rows} requests)",
                             extra={"chunk": report.index})
        except Exception as exc:
            if not database_blip(exc):
                raise
            # A progress report only: the chunk is safe on disk, and a database blip (a PostgreSQL restart,
            # which dagster-postgres reports as "too many retries for DB connection") must not fail a batch
            # that is generating fine. Not through context.log: that writes to the same database.
            log.warning("could not record progress of chunk %s: %s", report.index, type(exc).__name__)

    try:
        step = generate_batch(engine, storage, context.partition_key, progress, say=context.log.info,
                              warn=context.log.warning, cache=response_cache)
    except (BatchNotReady, EngineLoadError, StorageError) as exc:
        raise Failure(str(exc), allow_retries=False) from None
    except ChunksMissing as exc:  # the run retry resumes them
        raise Failure(str(exc)) from None
    metadata = step.metadata()
    return MaterializeResult(metadata={**metadata, "engines": MetadataValue.json(metadata["engines"]),
                                       "chunks_path": MetadataValue.path(str(storage.batch(context.partition_key).chunks_dir))})
