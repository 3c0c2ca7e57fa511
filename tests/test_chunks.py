"""Unit tests of chunking with a fake engine: chunks are written as they complete, never twice."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from assets.batch_input import REQUEST_SCHEMA
from batch_pipeline.domain.chunks import ChunkJob, run_chunks
from resources.engine_types import EngineDied
from resources.storage import BatchPaths


class FakeTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return " ".join(m["content"] for m in messages)

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 50 + 1 for c in text]


class FakeEngine:
    """Finishes requests in reverse order of admission, within windows, like a real scheduler might."""

    tokenizer = FakeTokenizer()
    max_model_len = 64
    runner = "generate"

    def __init__(self):
        self.admitted = []
        self.prompts = []

    def stream(self, requests, in_flight=None):
        window = []
        for request in requests:
            self.admitted.append(request.key)
            self.prompts.append(request.prompt_token_ids)
            window.append(request)
            if len(window) == (in_flight or 4):
                while window:
                    yield self._finish(window.pop())
        while window:
            yield self._finish(window.pop())

    def _finish(self, request):
        choice = SimpleNamespace(index=0, text="ok", token_ids=[1, 2], finish_reason="length", logprobs=None)
        return request, SimpleNamespace(outputs=[choice], finished=True)


def write_requests(paths: BatchPaths, count: int, long_at: int | None = None) -> None:
    rows = []
    for i in range(count):
        content = "x" * 200 if i == long_at else f"request {i}"
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2, "n": 1}
        rows.append({"line": i + 1, "custom_id": f"c{i}", "url": "/v1/chat/completions", "body": json.dumps(body)})
    paths.requests.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=REQUEST_SCHEMA), paths.requests)


def test_every_chunk_is_written_once_with_rows_in_input_order(tmp_path):
    paths = BatchPaths(tmp_path)
    write_requests(paths, 10)
    written = []
    run_chunks(FakeEngine(), ChunkJob(paths, "b", "m", 3, 10), written.append, in_flight=4)
    assert sorted(r.index for r in written) == [0, 1, 2, 3]
    assert [r.rows for r in sorted(written, key=lambda r: r.index)] == [3, 3, 3, 1]
    lines = [pq.read_table(paths.chunk(i))["line"].to_pylist() for i in range(4)]
    assert lines == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10]]


def test_finished_chunks_are_skipped_and_not_sent_to_the_engine(tmp_path):
    paths = BatchPaths(tmp_path)
    write_requests(paths, 10)
    engine = FakeEngine()
    written = []
    run_chunks(engine, ChunkJob(paths, "b", "m", 3, 10, frozenset({0, 2})), written.append)
    # Only the rows of chunks 1 and 3 reach the engine (engine keys are its own; the prompts tell the rows).
    assert engine.prompts == [FakeTokenizer().encode(f"request {i}") for i in (3, 4, 5, 9)]
    assert sorted(r.index for r in written) == [1, 3]


def test_a_request_the_engine_cannot_take_is_an_error_row_in_its_chunk(tmp_path):
    paths = BatchPaths(tmp_path)
    write_requests(paths, 4, long_at=1)
    run_chunks(FakeEngine(), ChunkJob(paths, "b", "m", 2, 4), lambda r: None)
    rows = pq.read_table(paths.chunk(0)).to_pylist()
    assert rows[0]["error"] is None and json.loads(rows[0]["response"])["body"]["object"] == "chat.completion"
    assert json.loads(rows[1]["error"])["code"] == "context_length_exceeded" and rows[1]["response"] is None


class DyingEngine(FakeEngine):
    """Dies (as a killed EngineCore does) when a request in `poison` is in flight, every time."""

    def __init__(self, poison: set[int]):
        super().__init__()
        self.poison = poison

    def stream(self, requests, in_flight=None):
        window = []
        for request in requests:
            self.admitted.append(request.key)
            window.append(request)
            if request.key in self.poison:
                raise EngineDied(window, "killed")
            if len(window) == (in_flight or 4):
                while window:
                    yield self._finish(window.pop())
        while window:
            yield self._finish(window.pop())


def test_a_dead_engine_is_replaced_and_only_a_request_in_flight_through_two_deaths_fails(tmp_path):
    paths = BatchPaths(tmp_path)
    write_requests(paths, 10)
    engines = [DyingEngine(poison={5})]

    def restart():
        engines.append(DyingEngine(poison={5} if len(engines) < 2 else set()))
        return engines[-1]

    written = []
    run_chunks(engines[0], ChunkJob(paths, "b", "m", 3, 10), written.append, in_flight=4, restart=restart)
    assert len(engines) == 3  # died with 4 and 5 in flight, then again with 5 (re-admitted first)
    assert engines[1].admitted[:2] == [4, 5] and 5 not in engines[2].admitted
    assert sorted(r.index for r in written) == [0, 1, 2, 3]  # every chunk once, none lost
    rows = {row["line"]: row for i in range(4) for row in pq.read_table(paths.chunk(i)).to_pylist()}
    assert sorted(rows) == list(range(1, 11))
    # Keys 4 and 5 (lines 5 and 6) were in flight through both deaths; every other line has its response.
    assert {line for line in rows if rows[line]["error"]} == {5, 6}
    assert json.loads(rows[6]["error"])["code"] == "engine_error"


def test_without_a_restart_a_dead_engine_fails_the_step(tmp_path):
    paths = BatchPaths(tmp_path)
    write_requests(paths, 10)
    with pytest.raises(EngineDied):
        run_chunks(DyingEngine(poison={2}), ChunkJob(paths, "b", "m", 3, 10), lambda r: None)


def test_claimed_chunks_are_the_only_ones_run_across_row_groups_in_claim_order(tmp_path):
    paths = BatchPaths(tmp_path)
    write_requests(paths, 10)
    table = pq.read_table(paths.requests)
    pq.write_table(table, paths.requests, row_group_size=4)  # chunks of 3 straddle row groups of 4
    claims = iter([3, 1, 2])
    engine = FakeEngine()
    written = []
    run_chunks(engine, ChunkJob(paths, "b", "m", 3, 10), written.append, claim=lambda: next(claims, None))
    assert engine.prompts == [FakeTokenizer().encode(f"request {i}") for i in (9, 3, 4, 5, 6, 7, 8)]
    assert sorted(r.index for r in written) == [1, 2, 3]
    assert pq.read_table(paths.chunk(1))["line"].to_pylist() == [4, 5, 6]
