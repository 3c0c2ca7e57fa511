"""Stage 3: merge the chunks into the OpenAI batch output and error files, plus a parquet copy."""


from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue, asset

from assets.batch_chunks import batch_chunks
from assets.batch_input import input_manifest
from batch_pipeline.domain.batches import batches_partitions, load_spec
from batch_pipeline.domain.chunks import ChunkDamaged, engine_args_for
from batch_pipeline.domain.replay import build_replay_record, public_view, save_replay_record
from batch_pipeline.domain.results import write_results
from resources.storage import BatchStorage, StorageError
from resources.vllm_engine import VLLMEngine


@asset(partitions_def=batches_partitions, deps=[batch_chunks], group_name="batch", kinds={"json", "parquet"})
def batch_results(context: AssetExecutionContext, storage: BatchStorage, engine: VLLMEngine) -> MaterializeResult:
    """output.jsonl and errors.jsonl in the OpenAI batch output format, in input order, and the batch's
    replay record (results/replay.json)."""
    paths = storage.batch(context.partition_key)
    manifest = input_manifest(paths)
    missing = set(range(manifest.num_chunks)) - paths.finished_chunks()
    if missing:
        raise Failure(f"cannot merge: {len(missing)} chunks are not finished yet ({sorted(missing)[:10]})")

    try:
        counts = write_results(paths, manifest)
    except (ChunkDamaged, StorageError) as exc:  # nothing was published: a re-run redoes what is missing
        raise Failure(str(exc), allow_retries=False) from None
    spec = load_spec(paths)
    # The engine's settings only (nothing loads): the arguments batch_chunks gave vllm.LLM for this batch.
    record = build_replay_record(spec, manifest, engine, engine.engine_kwargs(
        spec.model, engine_args_for(spec.engine_args, manifest.endpoints)))
    save_replay_record(paths, record)
    context.log.info(f"{counts.completed} requests completed, {counts.failed} failed; output: {paths.output}")
    return MaterializeResult(metadata={
        **counts.as_dict(),
        "output_file": MetadataValue.path(str(paths.output)),
        "error_file": MetadataValue.path(str(paths.errors)),
        "parquet_file": MetadataValue.path(str(paths.results_parquet)),
        "replay_record": MetadataValue.json(public_view(record)),
        "model_fingerprint": record.model_fingerprint.sha256 or record.model_fingerprint.revision or "",
        "vllm_version": record.versions.get("vllm") or "",
    })
