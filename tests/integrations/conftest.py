"""Fixtures shared by the integration tests: a batch folder as batch_results leaves it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def write_finished_batch(data_dir: Path, batch_id: str, output_bytes: int = 0, requests: int = 3) -> Path:
    """A batch's folder as batch_results leaves it: batch.json, output/errors JSONL, results.parquet, summary.json.

    `output_bytes` pads output.jsonl with further (well-formed) response lines up to about that size.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch_pipeline.domain.batches import BatchSpec, BatchSummary, save_spec, save_summary
    from resources.storage import BatchStorage

    paths = BatchStorage(data_dir=str(data_dir)).batch(batch_id)
    save_spec(paths, BatchSpec(batch_id=batch_id, input_path="/in.jsonl", model="/models/tiny", model_name="tiny",
                               chunk_size=16, metadata={"team": "search"}))
    paths.results_dir.mkdir(parents=True, exist_ok=True)
    body = {"status_code": 200, "request_id": "r", "body": {"object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "x" * 200}}]}}
    with paths.output.open("w") as output:
        line = 0
        while line < requests or output.tell() < output_bytes:
            output.write(json.dumps({"id": f"batch_req_{line}", "custom_id": f"req-{line}", "response": body,
                                     "error": None}) + "\n")
            line += 1
    paths.errors.write_text(json.dumps({"id": "batch_req_e", "custom_id": "bad", "response": None,
                                        "error": {"code": "invalid_request", "message": "no", "line": 99}}) + "\n")
    pq.write_table(pa.table({"custom_id": [f"req-{i}" for i in range(requests)]}), paths.results_parquet)
    save_summary(paths, BatchSummary(batch_id=batch_id, model="tiny", total=line + 1, completed=line, failed=1,
                                     prompt_tokens=10 * line, completion_tokens=20 * line,
                                     output_file=str(paths.output), error_file=str(paths.errors)))
    return paths.root


@pytest.fixture
def finished_batch(tmp_path: Path, sqlite_instance):
    """Make finished batches in this test's data folder, registered as partitions of the instance."""
    from batch_pipeline.domain.batches import batches_partitions

    def make(batch_id: str = "batch-1", **kwargs) -> Path:
        root = write_finished_batch(tmp_path / "data", batch_id, **kwargs)
        sqlite_instance.add_dynamic_partitions(batches_partitions.name, [batch_id])
        return root

    return make

