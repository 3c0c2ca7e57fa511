"""Stage 3: merge the chunks into the OpenAI batch output and error files, plus a parquet copy."""


import heapq
import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue, asset

from assets.batch_chunks import batch_chunks
from batch_pipeline.batches import batches_partitions
from batch_pipeline.chunks import CHUNK_SCHEMA
from resources.storage import BatchPaths, BatchStorage, atomic_path


def output_line(row: dict) -> str:
    """One line of output.jsonl for a chunk row that has a response."""
    # The response member is stored as JSON already; splice it in instead of parsing it again.
    return (f'{{"id":{json.dumps(row["id"])},"custom_id":{json.dumps(row["custom_id"])},'
            f'"response":{row["response"]},"error":null}}\n')


def _chunk_errors(paths: BatchPaths, num_chunks: int) -> Iterator[tuple[int, str]]:
    for index in range(num_chunks):
        table = pq.read_table(paths.chunk(index), columns=["line", "id", "custom_id", "error"])
        for row in table.filter(pa.compute.is_valid(table["error"])).to_pylist():
            record = {"id": row["id"], "custom_id": row["custom_id"], "response": None, "error": json.loads(row["error"])}
            yield row["line"], json.dumps(record, separators=(",", ":")) + "\n"


def invalid_lines(paths: BatchPaths) -> Iterator[tuple[int, str]]:
    """(line number, error record) for every line batch_input rejected, in line order."""
    with paths.invalid.open() as handle:
        for text in handle:
            yield json.loads(text)["error"]["line"], text


@asset(partitions_def=batches_partitions, deps=[batch_chunks], group_name="batch", kinds={"json", "parquet"})
def batch_results(context: AssetExecutionContext, storage: BatchStorage) -> MaterializeResult:
    """output.jsonl and errors.jsonl in the OpenAI batch output format, in input order."""
    paths = storage.batch(context.partition_key)
    manifest = json.loads(paths.manifest.read_text())
    num_chunks = manifest["num_chunks"]
    missing = set(range(num_chunks)) - paths.finished_chunks()
    if missing:
        raise Failure(f"cannot merge: {len(missing)} chunks are not finished yet ({sorted(missing)[:10]})")

    completed = failed = prompt_tokens = completion_tokens = 0
    with atomic_path(paths.output) as output_tmp, atomic_path(paths.results_parquet) as parquet_tmp:
        with output_tmp.open("w") as output, pq.ParquetWriter(parquet_tmp, CHUNK_SCHEMA) as parquet:
            for index in range(num_chunks):
                table = pq.read_table(paths.chunk(index), schema=CHUNK_SCHEMA)
                parquet.write_table(table)
                for row in table.to_pylist():
                    if row["error"] is not None:
                        failed += 1
                        continue
                    completed += 1
                    prompt_tokens += row["prompt_tokens"]
                    completion_tokens += row["completion_tokens"]
                    output.write(output_line(row))
    with atomic_path(paths.errors) as errors_tmp, errors_tmp.open("w") as errors:
        for _, text in heapq.merge(invalid_lines(paths), _chunk_errors(paths, num_chunks), key=lambda item: item[0]):
            errors.write(text)
    failed += manifest["invalid_lines"]

    summary = {"batch_id": manifest["batch_id"], "model": manifest["model_name"],
               "total": manifest["valid_requests"] + manifest["invalid_lines"],
               "completed": completed, "failed": failed,
               "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
               "output_file": str(paths.output), "error_file": str(paths.errors)}
    with atomic_path(paths.summary) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    context.log.info(f"{completed} requests completed, {failed} failed; output: {paths.output}")
    return MaterializeResult(metadata={
        "total": summary["total"], "completed": completed, "failed": failed,
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "output_file": MetadataValue.path(str(paths.output)),
        "error_file": MetadataValue.path(str(paths.errors)),
        "parquet_file": MetadataValue.path(str(paths.results_parquet)),
    })
