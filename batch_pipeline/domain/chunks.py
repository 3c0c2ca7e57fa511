"""Chunks: fixed slices of a batch's valid requests, each written atomically as one parquet file.

Chunk `i` holds the requests at positions `[i*chunk_size, (i+1)*chunk_size)` of `requests.parquet`,
so a chunk's content is fixed by the manifest and a finished chunk file is a checkpoint: a re-run
skips it and only the missing chunks are computed again.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, cast

import pyarrow as pa
import pyarrow.parquet as pq

from batch_pipeline.domain.openai_bodies import (
    RequestRejected,
    embedding_body,
    error_json,
    merge_completion_bodies,
    prepare_embedding,
    prepare_requests,
    response_body,
)
from batch_pipeline.domain.records import EMBEDDINGS_URL, BatchError, ErrorCode
from resources.engine_types import EngineDied, EngineFailure, EngineRequest
from resources.storage import (
    BatchPaths,
    Location,
    ParquetDamaged,
    atomic_path,
    is_local,
    parquet_file,
    parquet_footer,
    remove_file,
)
from resources.vllm_engine import Engine

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from vllm import RequestOutput

CHUNK_SCHEMA = pa.schema([
    ("line", pa.int64()),
    ("custom_id", pa.string()),
    ("id", pa.string()),
    ("response", pa.string()),  # the response body, JSON
    ("error", pa.string()),  # the error member, JSON
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("from_cache", pa.bool_()),  # answered from the response cache, not by the engine
])
CHUNK_COLUMNS = CHUNK_SCHEMA.names


class ChunkRow(TypedDict):
    """One row of a chunk file: a request's response (JSON) or its error member (JSON)."""

    line: int
    custom_id: str
    id: str
    response: str | None
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    from_cache: bool


class RequestRow(TypedDict):
    """One row of requests.parquet: a valid request line, its body as compact JSON."""

    line: int
    custom_id: str
    url: str
    body: str


def output_line_id(batch_id: str, line: int) -> str:
    """The `id` of an output line: stable for a (batch, line), so a redone chunk writes the same ids."""
    return "batch_req_" + hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:32]


def response_row(batch_id: str, row: RequestRow, body: dict[str, Any], *, from_cache: bool = False) -> ChunkRow:
    """The chunk row of a request answered with `body` (by the engine, or from the response cache)."""
    usage = body["usage"]
    return {
        "line": row["line"], "custom_id": row["custom_id"], "id": output_line_id(batch_id, row["line"]),
        "response": json.dumps({"status_code": 200, "request_id": f"vllm-batch-{uuid.uuid4().hex}",
                                "body": body}, separators=(",", ":")),
        "error": None,
        # `/v1/responses` counts input and output tokens; the other endpoints prompt and completion tokens.
        "prompt_tokens": usage.get("prompt_tokens", usage.get("input_tokens", 0)),
        "completion_tokens": usage.get("completion_tokens", usage.get("output_tokens", 0)),
        "from_cache": from_cache,
    }


@dataclass(slots=True)
class ChunkReport:
    index: int
    rows: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    from_cache: int = 0  # rows answered from the response cache (their tokens are not in the counts above)


@dataclass
class _OpenChunk:
    expected: int
    rows: list[ChunkRow] = field(default_factory=list)


class ChunkAssembler:
    """Collects finished rows per chunk and writes each chunk the moment its last row arrives."""

    def __init__(self, paths: BatchPaths, chunk_size: int, total: int, on_written: Callable[[ChunkReport], None]):
        self.paths = paths
        self.chunk_size = chunk_size
        self.total = total
        self.on_written = on_written
        self.open: dict[int, _OpenChunk] = {}

    def add(self, position: int, row: ChunkRow) -> None:
        index = position // self.chunk_size
        chunk = self.open.setdefault(index, _OpenChunk(chunk_rows(index, self.chunk_size, self.total)))
        chunk.rows.append(row)
        if len(chunk.rows) == chunk.expected:
            del self.open[index]
            self._write(index, chunk.rows)

    def _write(self, index: int, rows: list[ChunkRow]) -> None:
        rows.sort(key=lambda r: r["line"])
        table = pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA)
        with atomic_path(self.paths.chunk(index)) as tmp:
            pq.write_table(table, tmp)
        failed = sum(1 for r in rows if r["error"] is not None)
        # Tokens the engine processed: rows from the response cache cost none (the step's tokens/s).
        generated = [r for r in rows if not r["from_cache"]]
        self.on_written(ChunkReport(
            index, len(rows), failed,
            sum(r["prompt_tokens"] for r in generated), sum(r["completion_tokens"] for r in generated),
            len(rows) - len(generated)))


class ChunkDamaged(Exception):
    """A finished chunk file cannot be read back; it has been removed, so that the next run redoes it."""


def chunk_rows(index: int, chunk_size: int, total: int) -> int:
    """How many rows chunk `index` holds in a batch of `total` valid requests."""
    return min(chunk_size, total - index * chunk_size)


def chunk_damage(path: Location, rows: int) -> str | None:
    """Why a present chunk file cannot be trusted (not parquet, cut short, other columns or row count), or None.

    Reads the file's footer only. An error reaching the file (the object store is down) is raised, not
    reported as damage: a chunk that could not be read is not a chunk known to be bad.
    """
    try:
        footer = parquet_footer(path)
    except ParquetDamaged as exc:
        return exc.reason
    names = footer.schema.to_arrow_schema().names
    # from_cache came with the response cache: chunks an earlier version wrote lack it and read it as false.
    missing = [name for name in CHUNK_COLUMNS if name not in names and name != "from_cache"]
    if missing:
        return f"no column {', '.join(missing)}"
    if footer.num_rows != rows:
        return f"{footer.num_rows} rows where the chunk has {rows}"
    return None


def drop_damaged_chunks(paths: BatchPaths, finished: set[int], chunk_size: int, total: int,
                        warn: Callable[[str], None] = log.warning) -> set[int]:
    """The finished chunks that can be read back; each damaged one is removed, with a warning naming it.

    A finished chunk is a checkpoint that is never redone, so it must be readable before it is trusted:
    a disk that lost its tail, a copy cut short or a file overwritten by hand is redone instead of
    failing the merge (or, worse, being merged with rows missing).
    """
    def check(index: int) -> tuple[int, str | None]:
        return index, chunk_damage(paths.chunk(index), chunk_rows(index, chunk_size, total))

    indexes = sorted(finished)
    if is_local(paths.root) or len(indexes) < 2:
        checked = [check(index) for index in indexes]
    else:  # one footer read per chunk on an object store: a round trip each, so several at once
        with ThreadPoolExecutor(max_workers=16) as pool:
            checked = list(pool.map(check, indexes))
    readable = set()
    for index, damage in checked:
        if damage is None:
            readable.add(index)
            continue
        warn(f"chunk file {paths.chunk(index)} is damaged ({damage}): removed, the chunk is run again")
        remove_file(paths.chunk(index))
    return readable


def iter_requests(paths: BatchPaths, chunk_size: int, skip: set[int]) -> Iterator[tuple[int, RequestRow]]:
    """(position, row) for every request whose chunk is not in `skip`, reading row groups lazily."""
    with parquet_file(paths.requests) as source:
        position = 0
        for record_batch in source.iter_batches(batch_size=max(chunk_size, 1024)):
            for row in record_batch.to_pylist():
                if position // chunk_size not in skip:
                    yield position, cast(RequestRow, row)
                position += 1


def iter_claimed_requests(paths: BatchPaths, chunk_size: int, total: int,
                          claim: Callable[[], int | None]) -> Iterator[tuple[int, RequestRow]]:
    """(position, row) for every request of the chunks `claim` hands out, one chunk at a time, until it says None.

    Data parallel (batch_pipeline/domain/data_parallel.py): each engine asks for its next chunk only when its
    in-flight window needs more requests, so the chunks are shared by how fast each engine goes.
    """
    source = pq.ParquetFile(paths.requests)
    starts = list(itertools.accumulate((source.metadata.row_group(g).num_rows
                                        for g in range(source.metadata.num_row_groups)), initial=0))
    group, rows = -1, []
    while (index := claim()) is not None:
        for position in range(index * chunk_size, min((index + 1) * chunk_size, total)):
            wanted = bisect.bisect_right(starts, position) - 1
            if wanted != group:  # claims mostly go forward: one row group at a time is held
                group, rows = wanted, source.read_row_group(wanted).to_pylist()
            yield position, cast(RequestRow, rows[position - starts[group]])


def engine_args_for(engine_args: dict, endpoints: dict[str, int]) -> dict:
    """The kind of request most of the batch asks for decides the engine (one engine per batch, as
    OpenAI has one endpoint per batch): mostly /v1/embeddings runs a pooling engine, else a generative
    one; requests of the other kind then fail with `unsupported_endpoint`.

    `batch_chunks` passes the manifest's counts of valid requests; `vllm-batch run` passes the counts
    of the file's first lines (intake.survey) to prefetch the same engine before validation ends.
    """
    embeddings = endpoints.get(EMBEDDINGS_URL, 0)
    if embeddings and embeddings >= sum(endpoints.values()) - embeddings:
        return {"runner": "pooling", **engine_args}
    return engine_args


@dataclass(frozen=True, slots=True)
class ChunkJob:
    """What `run_chunks` generates: one batch's chunks, where they go and how they are cut."""

    paths: BatchPaths
    batch_id: str
    model_name: str  # the name the response bodies carry
    chunk_size: int
    total: int  # the batch's valid requests
    skip: frozenset[int] = frozenset()  # finished chunks


class ResponseSource(Protocol):
    """Answers some requests without the engine and learns from the engine's answers: the response cache
    (batch_pipeline/domain/response_reuse.py)."""

    def answer(self, rows: Iterator[tuple[int, RequestRow]],
               answered: Callable[[int, ChunkRow], None]) -> Iterator[tuple[int, RequestRow]]:
        """The rows it cannot answer, in order; each row it can answer goes to `answered` instead."""
        ...

    def generated(self, position: int, body: dict[str, Any]) -> None:
        """The engine answered the request at `position` with `body`."""
        ...

    def written(self, index: int) -> None:
        """Chunk `index` has been written: what it learnt from that chunk may be kept."""
        ...


def run_chunks(
    engine: Engine,
    job: ChunkJob,
    on_written: Callable[[ChunkReport], None],
    *,
    restart: Callable[[], Engine] | None = None,
    on_first_output: Callable[[], None] | None = None,
    claim: Callable[[], int | None] | None = None,
    in_flight: int | None = None,
    responses: ResponseSource | None = None,
) -> None:
    """Generate every request not in a finished chunk and write the missing chunks.

    With `claim`, only the chunks it hands out are run (one engine of several sharing a batch). With
    `responses`, the requests it answers skip the engine (generative requests only).

    If the engine dies mid-batch and `restart` is given, a new engine takes over: finished chunks
    stay, the requests that were in flight are admitted again, and a request that was in flight
    through two deaths becomes an `engine_error` line (it may be what kills the engine).
    """
    paths, batch_id, model_name, chunk_size = job.paths, job.batch_id, job.model_name, job.chunk_size

    def chunk_written(report: ChunkReport) -> None:
        if responses is not None:
            responses.written(report.index)
        on_written(report)

    assembler = ChunkAssembler(paths, chunk_size, job.total, chunk_written)
    positions: dict[int, RequestRow] = {}

    def failed_row(row: RequestRow, code: str, message: str) -> ChunkRow:
        error = BatchError(code=code, message=message, line=row["line"])
        return {"line": row["line"], "custom_id": row["custom_id"], "id": output_line_id(batch_id, row["line"]),
                "response": None, "error": error_json(error), "prompt_tokens": 0, "completion_tokens": 0,
                "from_cache": False}

    # A completions body with several prompts is one engine request per prompt; its row is written
    # once every part has finished (or as an error as soon as one part fails).
    part_of: dict[int, tuple[int, int]] = {}  # engine key -> (position, prompt index)
    parts: dict[int, list[tuple[EngineRequest, RequestOutput] | None]] = {}
    keys = itertools.count()

    def request_rows() -> Iterator[tuple[int, RequestRow]]:
        if claim is None:
            return iter_requests(paths, chunk_size, set(job.skip))
        return iter_claimed_requests(paths, chunk_size, job.total, claim)

    def engine_requests() -> Iterator[EngineRequest]:
        rows = request_rows() if responses is None else responses.answer(request_rows(), assembler.add)
        for position, row in rows:
            try:
                requests = prepare_requests(keys, row["url"], row["body"], engine.tokenizer, engine.max_model_len,
                                            engine.runner, remote=getattr(engine, "remote", False))
            except RequestRejected as exc:
                assembler.add(position, failed_row(row, exc.code, str(exc)))
                continue
            positions[position] = row
            parts[position] = [None] * len(requests)
            for index, request in enumerate(requests):
                part_of[request.key] = (position, index)
            yield from requests

    def succeeded_row(row: RequestRow, body: dict[str, Any]) -> ChunkRow:
        return response_row(batch_id, row, body)

    if engine.runner == "pooling":
        _run_embedding_chunks(engine, request_rows(), chunk_size, assembler, failed_row, succeeded_row, model_name)
    else:
        source = engine_requests()
        readmit: deque[EngineRequest] = deque()
        deaths: dict[int, int] = {}

        def admissions() -> Iterator[EngineRequest]:
            while readmit:
                yield readmit.popleft()
            for request in source:  # noqa: UP028 (`yield from` would close `source` with this generator)
                yield request

        def fail(position: int, message: str, code: str | None = None) -> None:
            parts.pop(position, None)
            assembler.add(position, failed_row(positions.pop(position), code or ErrorCode.ENGINE_ERROR, message))

        while True:
            try:
                for request, output in engine.stream(admissions(), in_flight=in_flight):
                    position, index = part_of.pop(request.key)
                    if position not in positions:  # another prompt of this row already failed it
                        continue
                    if isinstance(output, EngineFailure):
                        fail(position, output.message, output.code)
                        continue
                    finished = parts[position]
                    finished[index] = (request, output)
                    if any(part is None for part in finished):
                        continue
                    bodies = [response_body(part[0], part[1], model_name) for part in finished if part is not None]
                    body = bodies[0] if len(bodies) == 1 else merge_completion_bodies(bodies, request.params.n)
                    del parts[position]
                    if responses is not None:
                        responses.generated(position, body)
                    assembler.add(position, succeeded_row(positions.pop(position), body))
                    if on_first_output is not None:
                        on_first_output()
                        on_first_output = None
                break
            except EngineDied as died:
                if restart is None:
                    raise
                log.warning("%s; finished chunks are kept, starting a new engine", died)
                survivors = []
                for request in died.in_flight:
                    position, _ = part_of[request.key]
                    deaths[request.key] = deaths.get(request.key, 0) + 1
                    if position not in positions:  # its row already failed
                        part_of.pop(request.key)
                    elif deaths[request.key] >= 2:
                        part_of.pop(request.key)
                        fail(position, "the engine died twice while running this request")
                    else:
                        survivors.append(request)
                readmit.extendleft(reversed(survivors))
                engine = restart()
    if assembler.open:
        missing = sorted(assembler.open)
        raise RuntimeError(f"chunks {missing} did not receive all their rows; this is a bug")


def _run_embedding_chunks(engine: Engine, rows: Iterator[tuple[int, RequestRow]], chunk_size: int,
                          assembler: ChunkAssembler, failed_row: Callable, succeeded_row: Callable,
                          model_name: str) -> None:
    """A pooling engine embeds one chunk per call: prefill-only work leaves little to gain from
    keeping requests in flight across chunk boundaries."""

    def flush(rows: list[tuple[int, RequestRow]]) -> None:
        prepared = []
        for position, row in rows:
            try:
                if row["url"] != EMBEDDINGS_URL:
                    raise RequestRejected(ErrorCode.UNSUPPORTED_ENDPOINT, "this batch runs an embedding (pooling) "
                                          f"engine; {row['url']} needs a generative one")
                prepared.append((position, row, prepare_embedding(position, row["body"], engine.tokenizer,
                                                                  engine.max_model_len, engine.matryoshka)))
            except RequestRejected as exc:
                assembler.add(position, failed_row(row, exc.code, str(exc)))
        vectors = engine.embed([ids for _, _, request in prepared for ids in request.inputs])
        offset = 0
        for position, row, request in prepared:
            count = len(request.inputs)
            assembler.add(position, succeeded_row(row, embedding_body(request, vectors[offset:offset + count],
                                                                      model_name)))
            offset += count

    pending: list[tuple[int, RequestRow]] = []
    for position, row in rows:
        if pending and pending[0][0] // chunk_size != position // chunk_size:
            flush(pending)
            pending = []
        pending.append((position, row))
    if pending:
        flush(pending)
