"""Reusing a batch id with another input, model or chunk size: the old chunks and results are discarded.

Finished chunk files are checkpoints that a re-run skips; they are only valid for the input, model and
chunk size they were computed from (the fingerprint in input/manifest.json). A batch id registered
again with any of those changed must not reuse them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process
from tests.support.files import read_jsonl, write_jsonl
from tests.support.request_lines import completion_line

MODEL_NAME = "tiny-llama"
BATCH = "reused"


def texts(path: Path) -> dict[str, str]:
    return {o["custom_id"]: o["response"]["body"]["choices"][0]["text"] for o in read_jsonl(path)}


def validate_only(settings, instance) -> None:
    """Materialise batch_input alone (no engine): where stale outputs are found and removed."""
    from dagster import materialize

    from assets import batch_input
    from resources.storage import BatchStorage

    result = materialize([batch_input], partition_key=BATCH, instance=instance,
                         resources={"storage": BatchStorage(data_dir=str(settings.resolved_data_dir))})
    assert result.success


@pytest.mark.parametrize("change", ["input", "model", "chunk_size"])
def test_a_reused_batch_id_with_another_input_model_or_chunk_size_discards_stale_chunks(
        change, settings, sqlite_instance, tiny_model, loaded_engine, tmp_path):
    lines = [completion_line(f"s-{i}", f"Item {i} is", MODEL_NAME, max_tokens=6) for i in range(40)]  # chunks of 16: 3 chunks
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    register_local_batch(settings, sqlite_instance, path, str(tiny_model), MODEL_NAME, batch_id=BATCH)
    first = run_batch_in_process(settings, sqlite_instance, BATCH)
    assert first.success, first.error
    old_texts = texts(first.paths.output)
    assert len(list(first.paths.chunks_dir.glob("chunk-*.parquet"))) == 3

    model, chunk_size = str(tiny_model), None
    if change == "input":  # the same file name and custom_ids, other prompts
        write_jsonl(path, [completion_line(f"s-{i}", f"Another thing {i} was", MODEL_NAME, max_tokens=6) for i in range(40)])
    elif change == "model":
        model = str(shutil.copytree(tiny_model, tmp_path / "another-model"))
    else:
        chunk_size = 8
    register_local_batch(settings, sqlite_instance, path, model, MODEL_NAME, batch_id=BATCH, chunk_size=chunk_size)

    validate_only(settings, sqlite_instance)
    assert not list(first.paths.chunks_dir.glob("chunk-*.parquet")), "stale chunks were kept"
    assert not first.paths.output.exists() and not first.paths.summary.exists(), "stale results were kept"
    if change == "model":
        return  # running it would load a second engine; the stale chunks are already gone

    second = run_batch_in_process(settings, sqlite_instance, BATCH)
    assert second.success, second.error
    assert second.summary["chunks_resumed"] == 0
    chunk_files = sorted(second.paths.chunks_dir.glob("chunk-*.parquet"))
    if change == "chunk_size":
        assert [pq.read_metadata(p).num_rows for p in chunk_files] == [8] * 5
        assert texts(second.paths.output) == old_texts  # same input, same greedy outputs
    else:
        # The same input run under a fresh batch id gives what the reused id must give.
        register_local_batch(settings, sqlite_instance, path, model, MODEL_NAME, batch_id="fresh")
        fresh = run_batch_in_process(settings, sqlite_instance, "fresh")
        assert fresh.success, fresh.error
        assert texts(second.paths.output) == texts(fresh.paths.output)
        assert texts(second.paths.output) != old_texts
