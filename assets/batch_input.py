"""Stage 1: read the batch's JSONL file as a stream, keep the valid requests, record every bad line."""


from contextlib import ExitStack
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue, asset

from batch_pipeline.domain.batches import (
    BatchManifest,
    BatchRecordError,
    BatchSpec,
    batches_partitions,
    file_digest,
    load_manifest,
    load_spec,
    save_manifest,
)
from batch_pipeline.domain.chunks import output_line_id
from batch_pipeline.domain.constants import FAILURE_CODE_KEY, NO_VALID_REQUESTS
from batch_pipeline.domain.input_file import BatchFileError, InvalidLine, scan_batch_file
from batch_pipeline.domain.results import error_line
from batch_pipeline.domain.settings import get_settings
from resources.storage import BatchPaths, BatchStorage, Location, StorageError, atomic_path, local_copy, remove_tree

REQUEST_SCHEMA = pa.schema([("line", pa.int64()), ("custom_id", pa.string()), ("url", pa.string()), ("body", pa.string())])
_ROW_GROUP = 8192


def _fingerprint(digest: str, model: str, chunk_size: int) -> str:
    return f"{digest}:{model}:{chunk_size}"


def input_manifest(paths: BatchPaths) -> BatchManifest:
    """The manifest batch_input wrote, for the stages after it; a Failure that says why if there is none."""
    try:
        manifest = load_manifest(paths)
    except BatchRecordError as exc:
        raise Failure(f"{exc}: materialise batch_input again to rewrite it", allow_retries=False) from None
    if manifest is None:
        raise Failure("batch_input has not been materialised for this batch", allow_retries=False)
    return manifest


def _drop_stale_outputs(context: AssetExecutionContext, paths: BatchPaths, fingerprint: str) -> None:
    """Remove chunks and results made from a different input, or that an unreadable manifest cannot vouch for."""
    try:
        manifest = load_manifest(paths)
    except BatchRecordError as exc:
        why = f"{exc}: the chunks and results it described were removed"
    else:
        if manifest is None or manifest.fingerprint == fingerprint:
            return
        why = "the input changed since the last run: old chunks and results were removed"
    remove_tree(paths.chunks_dir)
    remove_tree(paths.results_dir)
    context.log.warning(why)


def _write_rows(writer: pq.ParquetWriter, columns: tuple[list, list, list, list]) -> None:
    writer.write_table(pa.Table.from_arrays([pa.array(values, type=field.type) for values, field in
                                             zip(columns, REQUEST_SCHEMA, strict=True)], schema=REQUEST_SCHEMA))
    for values in columns:
        values.clear()


@asset(partitions_def=batches_partitions, group_name="batch", kinds={"parquet"})
def batch_input(context: AssetExecutionContext, storage: BatchStorage) -> MaterializeResult:
    """The batch's valid requests as parquet, plus one error record per bad line."""
    paths = storage.batch(context.partition_key)
    spec = load_spec(paths)
    if spec.rejected:
        # A file the inbox refused (not JSONL, empty, unknown or mixed models): the run fails with the
        # reason, so it shows in the UI, the run's logs and `vllm-batch status`.
        raise Failure(f"batch rejected: {spec.rejected}", allow_retries=False,
                      metadata={FAILURE_CODE_KEY: spec.rejected_code or "invalid_file"})
    # Absolute paths stay absolute; on an object-store data root, intake copied the file beside the batch.
    input_path = paths.root.joinpath(spec.input_path)
    with ExitStack() as stack:
        try:
            local_input = stack.enter_context(local_copy(input_path))
        except OSError as exc:
            raise Failure(f"cannot read input file {input_path}: {exc.strerror or exc}", allow_retries=False,
                          metadata={FAILURE_CODE_KEY: "invalid_file"}) from None
        try:
            return _validate(context, spec, paths, input_path, local_input)
        except StorageError as exc:
            raise Failure(str(exc), allow_retries=False) from None


def _validate(context: AssetExecutionContext, spec: BatchSpec, paths: BatchPaths, input_path: Location,
              local_input: Path) -> MaterializeResult:
    try:
        digest = file_digest(local_input)
    except OSError as exc:
        raise Failure(f"cannot read input file {input_path}: {exc.strerror or exc}", allow_retries=False,
                      metadata={FAILURE_CODE_KEY: "invalid_file"}) from None
    fingerprint = _fingerprint(digest, spec.model, spec.chunk_size)
    _drop_stale_outputs(context, paths, fingerprint)

    valid = invalid = 0
    first_rejected: InvalidLine | None = None
    endpoints: dict[str, int] = {}
    try:
        lines = scan_batch_file(local_input, frozenset({spec.model, spec.model_name}), get_settings().max_line_bytes)
        with atomic_path(paths.requests) as requests_tmp, atomic_path(paths.invalid) as invalid_tmp:
            with pq.ParquetWriter(requests_tmp, REQUEST_SCHEMA) as writer, invalid_tmp.open("w") as errors:
                # One list per column: building the table from columns is cheaper than from row dicts.
                columns: tuple[list, list, list, list] = ([], [], [], [])
                numbers, custom_ids, urls, bodies = columns
                for item in lines:
                    if isinstance(item, InvalidLine):
                        invalid += 1
                        first_rejected = first_rejected or item
                        errors.write(error_line(output_line_id(spec.batch_id, item.line), item.custom_id, item.error))
                        continue
                    valid += 1
                    endpoints[item.url] = endpoints.get(item.url, 0) + 1
                    numbers.append(item.line)
                    custom_ids.append(item.custom_id)
                    urls.append(item.url)
                    bodies.append(item.body)
                    if len(numbers) >= _ROW_GROUP:
                        _write_rows(writer, columns)
                if numbers:
                    _write_rows(writer, columns)
    except BatchFileError as exc:
        raise Failure(str(exc), allow_retries=False, metadata={FAILURE_CODE_KEY: "invalid_file"}) from None
    if valid + invalid == 0:
        raise Failure(f"input file {input_path} is empty: it has no request lines", allow_retries=False,
                      metadata={FAILURE_CODE_KEY: "empty_file"})
    if valid == 0:
        # As OpenAI's validation fails a batch: nothing could run. The batch's errors list the lines
        # (read from invalid.jsonl, written above); a file with some good lines runs them instead.
        # The first line's reason in the message: one rejection (a `model` the command does not serve, a
        # wrong `url`) usually rejects them all, and the user should not need to open invalid.jsonl to see it.
        assert first_rejected is not None
        raise Failure(f"no line of the input file is a valid request ({invalid} rejected; line "
                      f"{first_rejected.line}: {first_rejected.error.message})",
                      allow_retries=False, metadata={FAILURE_CODE_KEY: NO_VALID_REQUESTS})

    num_chunks = -(-valid // spec.chunk_size)
    save_manifest(paths, BatchManifest(
        batch_id=spec.batch_id, fingerprint=fingerprint, input_sha256=digest, model=spec.model,
        model_name=spec.model_name, chunk_size=spec.chunk_size, valid_requests=valid, invalid_lines=invalid,
        num_chunks=num_chunks, endpoints=endpoints))
    if invalid:
        context.log.warning(f"{invalid} of {valid + invalid} lines were rejected; see {paths.invalid}")
    return MaterializeResult(metadata={
        "valid_requests": valid,
        "invalid_lines": invalid,
        "chunks": num_chunks,
        "chunk_size": spec.chunk_size,
        "model": spec.model_name,
        "requests_path": MetadataValue.path(str(paths.requests)),
        "input_sha256": digest,
    })
