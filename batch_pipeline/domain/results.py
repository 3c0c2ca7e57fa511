"""A batch's result files, written in one place: output.jsonl, errors.jsonl, results.parquet and the counts.

Every line of both files goes through `output_line` or `error_line`, whoever writes it: `batch_input`
(lines it rejects), `batch_results` (a finished batch) and the stop path (a cancelled or expired
batch keeps what it finished and gets one error line for each request that never ran). Lines are in
input order; errors from validation, from the engine and from the stop are merged by line number.
"""

from __future__ import annotations

import heapq
import json
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch_pipeline.domain.batches import BatchManifest, BatchSummary, load_manifest, save_summary
from batch_pipeline.domain.chunks import CHUNK_COLUMNS, CHUNK_SCHEMA, ChunkDamaged, iter_requests, output_line_id
from batch_pipeline.domain.records import BatchError
from resources.storage import BatchPaths, Location, ParquetDamaged, atomic_path, is_local, read_parquet, remove_file


def error_line(request_id: str, custom_id: str | None, error: BatchError | str) -> str:
    """One line of errors.jsonl; `error` is the error member, or that member already as compact JSON."""
    member = error if isinstance(error, str) else json.dumps(error.model_dump(exclude_none=True), separators=(",", ":"))
    return f'{{"id":{json.dumps(request_id)},"custom_id":{json.dumps(custom_id)},"response":null,"error":{member}}}\n'


def output_line(row: dict) -> str:
    """One line of output.jsonl for a chunk row that has a response."""
    # The response member is stored as JSON already; splice it in instead of parsing it again.
    return (f'{{"id":{json.dumps(row["id"])},"custom_id":{json.dumps(row["custom_id"])},'
            f'"response":{row["response"]},"error":null}}\n')


def chunk_output_lines(table: pa.Table) -> Iterator[tuple[dict, str]]:
    """(row, output line) for every row of a chunk table that has a response, in the chunk's (input) order.

    The one path from chunk rows to output lines: the final output.jsonl, a stopped batch's and the
    partial results of a running batch are byte-identical line for line.
    """
    for row in table.filter(pc.is_null(table["error"])).to_pylist():
        yield row, output_line(row)


# The response member is compact JSON written by this project: `"cached_tokens":` occurs once, in
# usage.prompt_tokens_details (a quote inside generated text is escaped, so it cannot match there).
_CACHED_TOKENS_RE = r'"cached_tokens":(?P<n>[0-9]+)'


def cached_tokens(responses: pa.ChunkedArray | pa.Array) -> int:
    """The sum of usage.prompt_tokens_details.cached_tokens over a column of response members."""
    found = pc.struct_field(pc.extract_regex(responses, _CACHED_TOKENS_RE), "n")
    return pc.sum(pc.cast(found, pa.int64())).as_py() or 0


def invalid_lines(paths: BatchPaths) -> Iterator[tuple[int, str]]:
    """(line number, error line) for every line batch_input rejected, in line order."""
    with paths.invalid.open() as handle:
        for text in handle:
            yield json.loads(text)["error"]["line"], text


@dataclass
class ResultCounts:
    """What the result files hold; summary.json (finished) or stopped.json (cancelled, expired)."""

    total: int = 0
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from vLLM's prefix cache
    from_cache: int = 0  # requests answered from the response cache (batch_pipeline/domain/response_reuse.py)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def read_chunk(path: Location, columns: list[str] | None = None) -> pa.Table:
    """A chunk file's table, the named columns (default: every column this version writes) in CHUNK_SCHEMA's
    types; chunks written before the response cache read `from_cache` as false. ParquetDamaged if the file is
    not a whole parquet file."""
    columns = columns or CHUNK_COLUMNS
    table = read_parquet(path)  # every column: one written by an older version may lack some (or carry more)
    if "from_cache" in columns and "from_cache" not in table.schema.names:
        table = table.append_column("from_cache", pa.array([False] * table.num_rows, pa.bool_()))
    return table.select(columns).cast(pa.schema([CHUNK_SCHEMA.field(name) for name in columns]))


def _read_chunk(paths: BatchPaths, index: int, columns: list[str] = CHUNK_COLUMNS) -> pa.Table:
    """A finished chunk's table; ChunkDamaged (and the file removed, so that a re-run redoes it) if it cannot
    be read whole. Generation checks each chunk's footer before trusting it; this catches the rest."""
    path = paths.chunk(index)
    try:
        return read_chunk(path, columns)
    except ParquetDamaged as exc:
        remove_file(path)
        raise ChunkDamaged(f"chunk file {exc}: it was removed, run the batch again to redo that chunk") from None


_READ_AHEAD = 8  # chunks fetched at once from an object store, in order: a round trip each, not one after another


def _read_chunks(paths: BatchPaths, chunks: list[int], columns: list[str] = CHUNK_COLUMNS) -> Iterator[pa.Table]:
    """The chunks' tables in order; on an object store the next few are fetched while one is merged."""
    if is_local(paths.root):
        for index in chunks:
            yield _read_chunk(paths, index, columns)
        return
    with ThreadPoolExecutor(max_workers=_READ_AHEAD) as pool:
        ahead: deque[Future[pa.Table]] = deque()
        for index in chunks:
            ahead.append(pool.submit(_read_chunk, paths, index, columns))
            if len(ahead) == _READ_AHEAD:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _write(paths: BatchPaths, manifest: BatchManifest, chunks: Iterable[int], not_run: BatchError | None,
           parquet: bool) -> ResultCounts:
    counts = ResultCounts(total=manifest.valid_requests + manifest.invalid_lines)
    chunks = sorted(chunks)
    with_errors: list[int] = []  # the chunks read again for their error rows (most batches have few)
    with ExitStack() as files:
        output = files.enter_context(files.enter_context(atomic_path(paths.output)).open("w"))
        parquet_writer = None
        if parquet:
            parquet_writer = files.enter_context(
                pq.ParquetWriter(files.enter_context(atomic_path(paths.results_parquet)), CHUNK_SCHEMA))
        for index, table in zip(chunks, _read_chunks(paths, chunks), strict=True):
            if parquet_writer is not None:
                parquet_writer.write_table(table)
            if table["error"].null_count < table.num_rows:
                with_errors.append(index)
            counts.cached_tokens += cached_tokens(table["response"])
            counts.from_cache += pc.sum(table["from_cache"]).as_py() or 0
            for row, line in chunk_output_lines(table):
                counts.completed += 1
                counts.prompt_tokens += row["prompt_tokens"]
                counts.completion_tokens += row["completion_tokens"]
                output.write(line)

    def chunk_errors() -> Iterator[tuple[int, str]]:
        # Read again, error rows only, so that memory stays bounded however many requests failed.
        for table in _read_chunks(paths, with_errors, ["line", "id", "custom_id", "error"]):
            for row in table.filter(pa.compute.is_valid(table["error"])).to_pylist():
                yield row["line"], error_line(row["id"], row["custom_id"], row["error"])

    def unfinished() -> Iterator[tuple[int, str]]:
        if not_run is None:
            return
        for _, row in iter_requests(paths, manifest.chunk_size, set(chunks)):
            error = not_run.model_copy(update={"line": row["line"]})
            yield row["line"], error_line(output_line_id(manifest.batch_id, row["line"]), row["custom_id"], error)

    with atomic_path(paths.errors) as errors_tmp, errors_tmp.open("w") as errors:
        for _, text in heapq.merge(invalid_lines(paths), chunk_errors(), unfinished(), key=lambda item: item[0]):
            errors.write(text)
            counts.failed += 1
    return counts


def write_results(paths: BatchPaths, manifest: BatchManifest) -> ResultCounts:
    """The result files of a batch whose chunks are all finished, and its summary.json."""
    counts = _write(paths, manifest, range(manifest.num_chunks), None, parquet=True)
    save_summary(paths, BatchSummary(batch_id=manifest.batch_id, model=manifest.model_name, **counts.as_dict(),
                                     output_file=str(paths.output), error_file=str(paths.errors)))
    return counts


def contiguous_chunks(paths: BatchPaths, num_chunks: int) -> int:
    """How many chunks from the first on are finished without a gap (chunks may finish out of order)."""
    finished = paths.finished_chunks()
    count = 0
    while count < num_chunks and count in finished:
        count += 1
    return count


def partial_output_lines(paths: BatchPaths) -> Iterator[str]:
    """The output lines of a running batch's finished chunks, as far as they are finished without a gap:
    a prefix of the final output.jsonl, each line byte-identical to its line there."""
    manifest = load_manifest(paths)
    if manifest is None:
        return
    for index in range(contiguous_chunks(paths, manifest.num_chunks)):
        try:
            table = _read_chunk(paths, index)
        except (FileNotFoundError, ChunkDamaged):
            return  # removed under us (the input changed and the batch restarted, or it was damaged): stop there
        for _, line in chunk_output_lines(table):
            yield line


STOP_ERRORS = {
    "cancelled": BatchError(code="batch_cancelled", message="the batch was cancelled before this request ran"),
    "expired": BatchError(code="batch_expired", message="the batch's completion window closed before this request ran"),
}


def write_stopped_results(paths: BatchPaths, reason: str) -> dict:
    """The result files of a batch stopped early: its finished chunks, then one error per request that
    did not run; returns (and writes to stopped.json) the counts with the reason."""
    manifest = load_manifest(paths)
    if manifest is None:  # stopped before validation: nothing ran, nothing to report per line
        for path in (paths.output, paths.errors):
            with atomic_path(path) as tmp:
                tmp.write_text("")
        counts = ResultCounts()
    else:
        finished = paths.finished_chunks() & set(range(manifest.num_chunks))
        counts = _write(paths, manifest, finished, STOP_ERRORS[reason], parquet=False)
    stopped = {**counts.as_dict(), "reason": reason}
    with atomic_path(paths.stopped) as tmp:
        tmp.write_text(json.dumps(stopped))
    return stopped
