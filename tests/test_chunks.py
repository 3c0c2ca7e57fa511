"""Unit tests of chunking with a fake engine: chunks are written as they complete, never twice."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq

from assets.batch_input import REQUEST_SCHEMA
from batch_pipeline.chunks import run_chunks
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

    def stream(self, requests, in_flight=None):
        window = []
        for request in requests:
            self.admitted.append(request.key)
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
    run_chunks(FakeEngine(), paths, batch_id="b", model_name="m", chunk_size=3, total=10, skip=set(),
               on_written=written.append, in_flight=4)
    assert sorted(r.index for r in written) == [0, 1, 2, 3]
    assert [r.rows for r in sorted(written, key=lambda r: r.index)] == [3, 3, 3, 1]
    lines = [pq.read_table(paths.chunk(i))["line"].to_pylist() for i in range(4)]
    assert lines == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10]]


def test_finished_chunks_are_skipped_and_not_sent_to_the_engine(tmp_path):
    paths = BatchPaths(tmp_path)
    write_requests(paths, 10)
    engine = FakeEngine()
    written = []
    run_chunks(engine, paths, batch_id="b", model_name="m", chunk_size=3, total=10, skip={0, 2},
               on_written=written.append)
    assert sorted(engine.admitted) == [3, 4, 5, 9]
    assert sorted(r.index for r in written) == [1, 3]


def test_a_request_the_engine_cannot_take_is_an_error_row_in_its_chunk(tmp_path):
    paths = BatchPaths(tmp_path)
    write_requests(paths, 4, long_at=1)
    run_chunks(FakeEngine(), paths, batch_id="b", model_name="m", chunk_size=2, total=4, skip=set(),
               on_written=lambda r: None)
    rows = pq.read_table(paths.chunk(0)).to_pylist()
    assert rows[0]["error"] is None and json.loads(rows[0]["response"])["body"]["object"] == "chat.completion"
    assert json.loads(rows[1]["error"])["code"] == "context_length_exceeded" and rows[1]["response"] is None
