"""The response cache's rules: which requests it may answer, under which key, and the lines it answers with.

A request is answered from the cache (resources/response_cache.py) when an earlier batch ran the same
request deterministically on the same engine: same key. The key is the sha256 of canonical JSON (sorted
keys, no free whitespace) of the endpoint URL, the whole validated body, and the engine context: the
model folder's identity, the name responses report, vLLM's version and every engine argument that can
change an output (dtype, max_model_len, structured-output settings, a tokenizer or revision given as
an engine argument, ...; not the throughput ones: memory share, tensor parallelism, max_num_seqs, eager
mode, the engine's default seed).

Only deterministic requests are cached: temperature 0, or an explicit `seed`; `n` > 1 never is, nor
embeddings, nor error lines. A body's `response_cache: false` (an extension field) keeps that request
out of the cache both ways; a batch whose metadata has `vbatch_response_cache: "false"` keeps the whole
batch out. A cached answer is the stored body with a fresh `id` (and fresh `created` times), as OpenAI
would give a new response object for the same output.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa

from batch_pipeline.domain.chunks import ChunkAssembler, ChunkJob, ChunkReport, ChunkRow, RequestRow, iter_requests, response_row
from batch_pipeline.domain.records import EMBEDDINGS_URL
from resources.response_cache import CacheEntry, ResponseCache

log = logging.getLogger(__name__)

# Batch metadata that keeps a batch out of the cache (neither read nor written): the value "false".
BATCH_OPT_OUT_KEY = "vbatch_response_cache"
# The body field (an extension) that keeps one request out of the cache: `false`.
REQUEST_OPT_OUT_FIELD = "response_cache"
# Engine arguments that change speed or memory, not what a deterministic request outputs.
_THROUGHPUT_ARGS = frozenset({"model", "gpu_memory_utilization", "tensor_parallel_size", "enforce_eager",
                              "max_num_seqs", "seed"})
_LOOKUP_BLOCK = 2048  # request rows looked up at once: one read per cache segment of the shards they touch
_STORE_BATCH = 2048  # answers of written chunks stored at once: fewer, larger segments
_SAMPLE = 64 * 1024  # bytes read at the start, middle and end of a large model file for its identity


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


@lru_cache(maxsize=8)
def _folder_identity(folder: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    root = Path(folder)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root).as_posix()
        if relative.startswith("."):  # .cache/, .git/: not the model
            continue
        size = file.stat().st_size
        digest.update(f"{relative}\0{size}\0".encode())
        with file.open("rb") as handle:
            if size <= 3 * _SAMPLE:
                digest.update(handle.read())
                continue
            for offset in (0, size // 2, size - _SAMPLE):
                handle.seek(offset)
                digest.update(handle.read(_SAMPLE))
    return "folder:" + digest.hexdigest()


def model_identity(model: str) -> str:
    """What the engine loads, as a value that changes when the model does: for a local folder a hash of its
    file names, sizes, small files whole and samples of large ones (weights); for a hub id, the id."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return f"hub:{model}"  # a `revision` engine argument is part of the engine context
    stamp = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))
    return _folder_identity(str(folder.resolve()), stamp)


def engine_context(model: str, model_name: str, engine_kwargs: dict[str, Any]) -> str:
    """The part of every key that names the engine: model identity, reported name, vLLM version, output-relevant args."""
    try:
        vllm_version = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        vllm_version = "unknown"
    settings = {name: value for name, value in engine_kwargs.items() if name not in _THROUGHPUT_ARGS}
    return hashlib.sha256(_canonical({"model": model_identity(model), "model_name": model_name,
                                      "vllm": vllm_version, "engine": settings})).hexdigest()


def cacheable(url: str, body: dict[str, Any]) -> bool:
    """Whether the response to this body is deterministic and may be cached: temperature 0 or a seed, one choice."""
    if url == EMBEDDINGS_URL or body.get(REQUEST_OPT_OUT_FIELD) is False or body.get("n", 1) != 1:
        return False
    return body.get("temperature") == 0 or body.get("seed") is not None


def request_key(context: str, url: str, body: dict[str, Any]) -> str:
    """The cache key of a request: sha256 of canonical JSON of the engine context, the URL and the body."""
    request = {name: value for name, value in body.items() if name != REQUEST_OPT_OUT_FIELD}
    return hashlib.sha256(_canonical({"engine": context, "url": url, "body": request})).hexdigest()


def batch_uses_cache(cache: ResponseCache, batch_metadata: dict[str, str]) -> bool:
    """Whether a batch reads and writes the cache: the instance's cache is on and the batch did not opt out."""
    return cache.enabled and batch_metadata.get(BATCH_OPT_OUT_KEY, "").strip().lower() != "false"


def _fresh_id(old: str) -> str:
    cut = max(old.rfind("-"), old.rfind("_"))
    return f"{old[:cut + 1]}{uuid.uuid4().hex}"


def fresh_body(body: dict[str, Any]) -> dict[str, Any]:
    """A cached response body as a new response object: new ids and creation times, the rest as stored."""
    now = int(time.time())
    body = dict(body, id=_fresh_id(str(body.get("id", ""))))
    for stamp in ("created", "created_at", "completed_at"):
        if body.get(stamp) is not None:
            body[stamp] = now
    if isinstance(body.get("output"), list):  # a Responses object's output items have ids of their own
        body["output"] = [dict(item, id=_fresh_id(item["id"])) if isinstance(item, dict) and "id" in item else item
                          for item in body["output"]]
    return body


class ResponseReuse:
    """One batch's use of the cache in `run_chunks`: answers rows from it, stores the engine's answers once
    their chunk is written (gathered to 2,048 answers or the step's end, `flush`, so that segments are few).
    A failing cache (unreadable store, full disk) costs hits, never the batch."""

    def __init__(self, cache: ResponseCache, context: str, batch_id: str, chunk_size: int):
        self.cache = cache
        self.context = context
        self.batch_id = batch_id
        self.chunk_size = chunk_size
        self._keys: dict[int, str] = {}  # position -> key, for cacheable requests sent to the engine
        self._fresh: dict[int, list[CacheEntry]] = {}  # chunk index -> the engine's answers, chunk not written yet
        self._ready: list[CacheEntry] = []  # answers of written chunks, not stored yet

    def answer(self, rows: Iterator[tuple[int, RequestRow]],
               answered: Callable[[int, ChunkRow], None]) -> Generator[tuple[int, RequestRow], None, None]:
        """The rows the cache cannot answer; the others go to `answered`. Looked up a block of rows at a time."""
        while block := list(itertools.islice(rows, _LOOKUP_BLOCK)):
            keys = {}
            for position, row in block:
                body = json.loads(row["body"])
                if cacheable(row["url"], body):
                    keys[position] = request_key(self.context, row["url"], body)
            found = self._lookup(set(keys.values()))
            for position, row in block:
                key = keys.get(position)
                entry = found.get(key) if key is not None else None
                if entry is None:
                    if key is not None:
                        self._keys[position] = key
                    yield position, row
                else:
                    answered(position, response_row(self.batch_id, row, fresh_body(json.loads(entry.body)),
                                                    from_cache=True))

    def _lookup(self, keys: set[str]) -> dict[str, CacheEntry]:
        if not keys:
            return {}
        try:
            return self.cache.lookup(keys)
        except (OSError, pa.ArrowException) as exc:
            log.warning("response cache: lookup failed, these requests go to the engine: %s", exc)
            return {}

    def generated(self, position: int, body: dict[str, Any]) -> None:
        """Keep the engine's answer to a cacheable request until its chunk is written."""
        key = self._keys.pop(position, None)
        if key is None:
            return
        usage = body["usage"]
        entry = CacheEntry(key, json.dumps(body, separators=(",", ":")),
                           usage.get("prompt_tokens", usage.get("input_tokens", 0)),
                           usage.get("completion_tokens", usage.get("output_tokens", 0)))
        self._fresh.setdefault(position // self.chunk_size, []).append(entry)

    def written(self, index: int) -> None:
        """Chunk `index` is on disk: its new answers may be stored (a crash before that loses cache entries only)."""
        for position in range(index * self.chunk_size, (index + 1) * self.chunk_size):
            self._keys.pop(position, None)  # rows of this chunk that failed in the engine
        self._ready.extend(self._fresh.pop(index, ()))
        if len(self._ready) >= _STORE_BATCH:
            self.flush()

    def flush(self) -> None:
        """Store the answers of the chunks written so far."""
        entries, self._ready = self._ready, []
        if not entries:
            return
        try:
            self.cache.store(entries)
        except (OSError, pa.ArrowException) as exc:
            log.warning("response cache: could not store %d responses: %s", len(entries), exc)


def answers_all(cache: ResponseCache, context: str, requests: Iterable[tuple[str, str]]) -> bool:
    """Whether the cache answers every one of these (url, validated body JSON) requests; none given: False."""
    keys = set()
    for url, body_json in requests:
        body = json.loads(body_json)
        if not cacheable(url, body):
            return False
        keys.add(request_key(context, url, body))
    return bool(keys) and len(cache.lookup(keys)) == len(keys)


def answer_whole_chunks(job: ChunkJob, reuse: ResponseReuse, on_written: Callable[[ChunkReport], None]) -> set[int]:
    """Before any engine loads: write every chunk the cache answers entirely, up to the first request it
    cannot answer (from there on, `run_chunks` looks up the rest with an engine at hand). Returns the
    chunks written; when they are all of the batch's missing chunks, no engine is needed at all."""
    written: set[int] = set()

    def chunk_written(report: ChunkReport) -> None:
        written.add(report.index)
        on_written(report)

    assembler = ChunkAssembler(job.paths, job.chunk_size, job.total, chunk_written)
    misses = reuse.answer(iter_requests(job.paths, job.chunk_size, set(job.skip)), assembler.add)
    next(misses, None)
    misses.close()
    return written
