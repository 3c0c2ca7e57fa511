"""A batch's result files, written in one place: output.jsonl, errors.jsonl, results.parquet and the counts.

Every line of both files goes through `output_line` or `error_line`, whoever writes it: `batch_input`
(lines it rejects), `batch_results` (a finished batch) and the stop path (a cancelled or expired
batch keeps what it finished and gets one error line for each request that never ran). Lines are in
input order; errors from validation, from the engine and from the stop are merged by line number.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from batch_pipeline.chunks import CHUNK_COLUMNS, CHUNK_SCHEMA, iter_requests, output_line_id
from batch_pipeline.records import BatchError
from resources.storage import BatchPaths, atomic_path, read_parquet


def error_line(request_id: str, custom_id: str | None, error: BatchError | str) -> str:
    """One line of errors.jsonl; `error` is the error member, or that member already as compact JSON."""
    member = error if isinstance(error, str) else json.dumps(error.model_dump(exclude_none=True), separators=(",", ":"))
    return f'{{"id":{json.dumps(request_id)},"custom_id":{json.dumps(custom_id)},"response":null,"error":{member}}}\n'


def output_line(row: dict) -> str:
    """One line of output.jsonl for a chunk row that has a response."""
    # The response member is stored as JSON already; splice it in instead of parsing it again.
    return (f'{{"id":{json.dumps(row["id"])},"custom_id":{json.dumps(row["custom_id"])},'
            f'"response":{row["response"]},"error":null}}\n')


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

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _read_chunk(paths: BatchPaths, index: int) -> pa.Table:
    # Only the columns this version writes: chunks left by an older version may carry more.
    return read_parquet(paths.chunk(index), columns=CHUNK_COLUMNS).cast(CHUNK_SCHEMA)


def _write(paths: BatchPaths, manifest: dict, chunks: Iterable[int], not_run: BatchError | None,
           parquet: bool) -> ResultCounts:
    counts = ResultCounts(total=manifest["valid_requests"] + manifest["invalid_lines"])
    chunks = sorted(chunks)
    with ExitStack() as files:
        output = files.enter_context(files.enter_context(atomic_path(paths.output)).open("w"))
        parquet_writer = None
        if parquet:
            parquet_writer = files.enter_context(
                pq.ParquetWriter(files.enter_context(atomic_path(paths.results_parquet)), CHUNK_SCHEMA))
        for index in chunks:
            table = _read_chunk(paths, index)
            if parquet_writer is not None:
                parquet_writer.write_table(table)
            for row in table.filter(pa.compute.is_null(table["error"])).to_pylist():
                counts.completed += 1
                counts.prompt_tokens += row["prompt_tokens"]
                counts.completion_tokens += row["completion_tokens"]
                output.write(output_line(row))

    def chunk_errors() -> Iterator[tuple[int, str]]:
        # Read again, error rows only, so that memory stays bounded however many requests failed.
        for index in chunks:
            table = read_parquet(paths.chunk(index), columns=["line", "id", "custom_id", "error"])
            for row in table.filter(pa.compute.is_valid(table["error"])).to_pylist():
                yield row["line"], error_line(row["id"], row["custom_id"], row["error"])

    def unfinished() -> Iterator[tuple[int, str]]:
        if not_run is None:
            return
        for _, row in iter_requests(paths, manifest["chunk_size"], set(chunks)):
            error = not_run.model_copy(update={"line": row["line"]})
            yield row["line"], error_line(output_line_id(manifest["batch_id"], row["line"]), row["custom_id"], error)

    with atomic_path(paths.errors) as errors_tmp, errors_tmp.open("w") as errors:
        for _, text in heapq.merge(invalid_lines(paths), chunk_errors(), unfinished(), key=lambda item: item[0]):
            errors.write(text)
            counts.failed += 1
    return counts


def write_results(paths: BatchPaths, manifest: dict) -> ResultCounts:
    """The result files of a batch whose chunks are all finished, and its summary.json."""
    counts = _write(paths, manifest, range(manifest["num_chunks"]), None, parquet=True)
    summary = {"batch_id": manifest["batch_id"], "model": manifest["model_name"], **counts.as_dict(),
               "output_file": str(paths.output), "error_file": str(paths.errors)}
    with atomic_path(paths.summary) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return counts


STOP_ERRORS = {
    "cancelled": BatchError(code="batch_cancelled", message="the batch was cancelled before this request ran"),
    "expired": BatchError(code="batch_expired", message="the batch's completion window closed before this request ran"),
}


def write_stopped_results(paths: BatchPaths, reason: str) -> dict:
    """The result files of a batch stopped early: its finished chunks, then one error per request that
    did not run; returns (and writes to stopped.json) the counts with the reason."""
    manifest = json.loads(paths.manifest.read_text()) if paths.manifest.exists() else None
    if manifest is None:  # stopped before validation: nothing ran, nothing to report per line
        for path in (paths.output, paths.errors):
            with atomic_path(path) as tmp:
                tmp.write_text("")
        counts = ResultCounts()
    else:
        finished = paths.finished_chunks() & set(range(manifest["num_chunks"]))
        counts = _write(paths, manifest, finished, STOP_ERRORS[reason], parquet=False)
    stopped = {**counts.as_dict(), "reason": reason}
    with atomic_path(paths.stopped) as tmp:
        tmp.write_text(json.dumps(stopped))
    return stopped
