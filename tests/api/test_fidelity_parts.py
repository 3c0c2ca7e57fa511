"""OpenAI fidelity without an engine: file expiry in the store, partial output lines, cached-token sums."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_pipeline.domain.batches import BatchManifest, BatchSummary, save_manifest, save_summary
from batch_pipeline.domain.chunks import CHUNK_SCHEMA, output_line_id
from batch_pipeline.domain.results import cached_tokens, partial_output_lines, write_results
from batch_pipeline.entrypoints.api.files import FileExpired, FileNotFound, FileStore
from batch_pipeline.entrypoints.api.schemas import ExpiresAfter, expires_seconds
from resources.storage import BatchStorage, atomic_path


def test_expiry_policies_take_only_the_created_at_anchor_and_openais_bounds():
    assert expires_seconds(None, "expires_after") is None
    assert expires_seconds(ExpiresAfter(anchor="created_at", seconds=3600), "x") == 3600
    assert expires_seconds(ExpiresAfter(anchor="created_at", seconds=2592000), "x") == 2592000
    for anchor, seconds in (("created_at", 3599), ("created_at", 2592001), ("created_at", 0), ("last_used", 3600)):
        with pytest.raises(ValueError, match="output_expires_after"):
            expires_seconds(ExpiresAfter(anchor=anchor, seconds=seconds), "output_expires_after")


def _upload(store: FileStore, text: str, expires_after: int | None):
    path = store.upload_path()
    path.write_text(text)
    return store.adopt(path, "in.jsonl", "batch", expires_after=expires_after)


def test_an_expired_file_answers_not_found_at_once_and_the_sweep_deletes_only_due_files(tmp_path: Path):
    store = FileStore(tmp_path)
    due = _upload(store, "a\n", 3600)
    later = _upload(store, "b\n", 7200)
    forever = _upload(store, "c\n", None)
    assert due.expires_at == due.created_at + 3600 and forever.expires_at is None
    now = due.created_at + 3600 - 1
    assert store.expire_due([tmp_path], now) == []  # nothing before its time
    assert store.get(due.id, now=now).file == due

    now = due.created_at + 3600
    with pytest.raises(FileExpired):
        store.get(due.id, now=now)  # gone from the moment it expires, swept or not
    assert store.expire_due([tmp_path], now) == [due.id]
    assert not (tmp_path / "files" / due.id / "content").exists()
    with pytest.raises(FileNotFound, match="expired"):
        store.get(due.id)
    assert {f.id for f in store.page(100)[0]} == {later.id, forever.id}
    assert store.content_path(later.id).read_text() == "b\n"


def _write_chunk(paths, index: int, lines: list[int], cached: int) -> None:
    rows = []
    for line in lines:
        failed = line % 5 == 0
        body = {"usage": {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": cached}},
                "choices": [{"message": {"content": 'say "cached_tokens":99'}}]}
        rows.append({"line": line, "custom_id": f"c{line}", "id": output_line_id("b", line),
                     "response": None if failed else json.dumps({"status_code": 200, "body": body},
                                                                separators=(",", ":")),
                     "error": json.dumps({"code": "engine_error", "message": "x", "line": line}) if failed else None,
                     "prompt_tokens": 0 if failed else 10, "completion_tokens": 0 if failed else 2})
    with atomic_path(paths.chunk(index)) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA), tmp)


def test_partial_output_is_the_gapless_prefix_of_chunks_and_equals_the_final_lines(tmp_path: Path):
    paths = BatchStorage(data_dir=str(tmp_path)).batch("b")
    manifest = BatchManifest(batch_id="b", fingerprint="f", input_sha256="s", model="m", model_name="m", chunk_size=4,
                             valid_requests=12, invalid_lines=0, num_chunks=3)
    save_manifest(paths, manifest)
    paths.invalid.write_text("")
    assert list(partial_output_lines(paths)) == []

    _write_chunk(paths, 1, [5, 6, 7, 8], cached=3)  # finished before chunk 0: not shown yet (a gap)
    assert list(partial_output_lines(paths)) == []
    _write_chunk(paths, 0, [1, 2, 3, 4], cached=3)
    first = list(partial_output_lines(paths))
    assert [json.loads(line)["custom_id"] for line in first] == ["c1", "c2", "c3", "c4", "c6", "c7", "c8"]
    _write_chunk(paths, 2, [9, 10, 11, 12], cached=3)
    every = list(partial_output_lines(paths))
    assert every[:len(first)] == first and len(set(every)) == len(every)

    counts = write_results(paths, manifest)
    assert paths.output.read_text() == "".join(every)  # byte for byte the final file
    # Ten successful responses with 3 cached tokens each; the quoted text in the content does not count.
    assert counts.cached_tokens == 30
    table = pq.read_table(paths.chunk(0))
    assert cached_tokens(table["response"]) == 12


def test_the_sweep_expires_the_results_of_a_batch_nobody_read_and_nothing_before_its_time(settings, sqlite_instance,
                                                                                       tiny_model, tmp_path):
    import os

    from batch_pipeline.domain.batches import Submission, save_submission
    from batch_pipeline.domain.intake import register
    from batch_pipeline.domain.models import ServedModel
    from batch_pipeline.entrypoints.api.files import result_file_id
    from batch_pipeline.entrypoints.api.service import BatchService

    source = tmp_path / "in.jsonl"
    source.write_text("{}\n")
    service = BatchService(settings, sqlite_instance)
    hours_ago = time.time() - 2 * 3600
    for batch_id, finished_at in (("old", hours_ago), ("fresh", time.time())):
        register(settings, sqlite_instance, source, ServedModel(name="m", model=str(tiny_model)), source="api",
                 batch_id=batch_id)
        paths = service.storage.batch(batch_id)
        save_submission(paths, Submission(input_file_id="file-0123456789abcdef01234567", output_expires_after=3600))
        paths.results_dir.mkdir(parents=True)
        paths.output.write_text('{"id": "x"}\n')
        paths.errors.write_text('{"id": "y"}\n')
        save_summary(paths, BatchSummary(batch_id=batch_id, model="m", total=2, completed=1, failed=1, prompt_tokens=0,
                                         completion_tokens=0, output_file=str(paths.output),
                                         error_file=str(paths.errors)))
        for path in (paths.output, paths.errors):
            os.utime(path, (finished_at, finished_at))

    # Neither batch was ever read: the sweep registers their result files with their expiry, then
    # deletes those of the batch that finished two hours ago (expiry one hour after the files were made).
    expired = set(service.expire_files())
    assert expired == {result_file_id("old", "output"), result_file_id("old", "errors")}
    old = service.storage.batch("old")
    assert not old.output.exists() and not old.errors.exists() and old.summary.exists()
    fresh = service.describe("fresh")
    assert service.files.get(fresh.output_file_id).file.expires_at == int(os.stat(
        service.storage.batch("fresh").output).st_mtime) + 3600
    assert service.expire_files() == []
    batch = service.describe("old")
    assert batch.status == "completed" and batch.output_file_id == result_file_id("old", "output")
    with pytest.raises(FileExpired):
        service.files.content_path(batch.output_file_id)
