"""Stage 3: merge the chunks into the OpenAI batch output and error files, plus a parquet copy."""


from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue, asset

from assets.batch_chunks import batch_chunks
from assets.batch_input import input_manifest
from batch_pipeline.domain.batches import batches_partitions
from batch_pipeline.domain.chunks import ChunkDamaged
from batch_pipeline.domain.results import write_results
from resources.storage import BatchStorage, StorageError


@asset(partitions_def=batches_partitions, deps=[batch_chunks], group_name="batch", kinds={"json", "parquet"})
def batch_results(context: AssetExecutionContext, storage: BatchStorage) -> MaterializeResult:
    """output.jsonl and errors.jsonl in the OpenAI batch output format, in input order."""
    paths = storage.batch(context.partition_key)
    manifest = input_manifest(paths)
    missing = set(range(manifest.num_chunks)) - paths.finished_chunks()
    if missing:
        raise Failure(f"cannot merge: {len(missing)} chunks are not finished yet ({sorted(missing)[:10]})")

    try:
        counts = write_results(paths, manifest)
    except (ChunkDamaged, StorageError) as exc:  # nothing was published: a re-run redoes what is missing
        raise Failure(str(exc), allow_retries=False) from None
    context.log.info(f"{counts.completed} requests completed, {counts.failed} failed; output: {paths.output}")
    return MaterializeResult(metadata={
        **counts.as_dict(),
        "output_file": MetadataValue.path(str(paths.output)),
        "error_file": MetadataValue.path(str(paths.errors)),
        "parquet_file": MetadataValue.path(str(paths.results_parquet)),
    })
