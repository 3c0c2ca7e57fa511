"""manifest.json and summary.json: one model each, read and written in one place, old files still read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dagster import Failure

from assets.batch_input import input_manifest
from batch_pipeline.domain.batches import (
    BatchManifest,
    BatchRecordError,
    BatchSummary,
    load_manifest,
    load_summary,
    save_manifest,
    save_summary,
)
from batch_pipeline.domain.status import ChunkStats
from resources.storage import BatchPaths, BatchStorage

MANIFEST = BatchManifest(batch_id="b1", fingerprint="abc:m:16", input_sha256="abc", model="/models/m", model_name="m",
                         chunk_size=16, valid_requests=40, invalid_lines=2, num_chunks=3,
                         endpoints={"/v1/chat/completions": 40})
SUMMARY = BatchSummary(batch_id="b1", model="m", total=42, completed=39, failed=3, prompt_tokens=400,
                       completion_tokens=800, cached_tokens=64, output_file="/d/output.jsonl", error_file="/d/errors.jsonl")


@pytest.fixture
def paths(tmp_path: Path) -> BatchPaths:
    return BatchStorage(data_dir=str(tmp_path)).batch("b1")


def test_manifest_and_summary_read_back_what_was_saved_under_the_field_names_on_disk(paths: BatchPaths):
    save_manifest(paths, MANIFEST)
    save_summary(paths, SUMMARY)
    assert load_manifest(paths) == MANIFEST and load_summary(paths) == SUMMARY
    assert list(json.loads(paths.manifest.read_text())) == [
        "batch_id", "fingerprint", "input_sha256", "model", "model_name", "chunk_size", "valid_requests",
        "invalid_lines", "num_chunks", "endpoints"]
    assert list(json.loads(paths.summary.read_text())) == [
        "batch_id", "model", "total", "completed", "failed", "prompt_tokens", "completion_tokens", "cached_tokens",
        "from_cache", "output_file", "error_file"]


def test_files_written_by_earlier_versions_still_load_and_unknown_fields_are_ignored(paths: BatchPaths):
    # The first manifests had no endpoints and the first summaries no cached_tokens; a later version may add fields.
    paths.manifest.parent.mkdir(parents=True)
    paths.manifest.write_text(json.dumps({
        "batch_id": "b1", "fingerprint": "abc:m:16", "input_sha256": "abc", "model": "/models/m", "model_name": "m",
        "chunk_size": 16, "valid_requests": 40, "invalid_lines": 2, "num_chunks": 3, "added_later": [1]}, indent=2))
    paths.summary.parent.mkdir(parents=True)
    paths.summary.write_text(json.dumps({
        "batch_id": "b1", "model": "m", "total": 42, "completed": 39, "failed": 3, "prompt_tokens": 400,
        "completion_tokens": 800, "output_file": "/d/output.jsonl", "error_file": "/d/errors.jsonl",
        "added_later": "x"}, indent=2))
    assert load_manifest(paths) == MANIFEST.model_copy(update={"endpoints": {}})
    assert load_summary(paths) == SUMMARY.model_copy(update={"cached_tokens": 0})


def test_a_missing_file_reads_as_not_written_yet(paths: BatchPaths):
    assert load_manifest(paths) is None and load_summary(paths) is None
    assert ChunkStats().progress(paths) is None  # the status of a batch batch_input has not reached


@pytest.mark.parametrize(("content", "problem"), [
    ('{"batch_id": "b1", "fingerprint": ', "Invalid JSON"),
    ("[]", "the file: Input should be an object"),
    ('{"batch_id": "b1"}', "num_chunks: Field required"),
    (MANIFEST.model_dump_json().replace('"num_chunks":3', '"num_chunks":"three"'), "num_chunks: Input should be"),
    (b"\xff\xfe not text", "Invalid JSON"),
])
def test_a_damaged_manifest_is_one_clear_error_naming_the_file_and_the_problem(paths: BatchPaths, content, problem):
    paths.manifest.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        paths.manifest.write_bytes(content)
    else:
        paths.manifest.write_text(content)
    with pytest.raises(BatchRecordError) as raised:
        load_manifest(paths)
    message = str(raised.value)
    assert message.startswith(f"{paths.manifest} is damaged (") and problem in message and "\n" not in message
    with pytest.raises(BatchRecordError, match="is damaged"):
        ChunkStats().progress(paths)  # where a status read would have crashed: the same message


def test_a_damaged_summary_is_one_clear_error(paths: BatchPaths):
    paths.summary.parent.mkdir(parents=True)
    paths.summary.write_text('{"total": 2, "completed": 1, "failed": 1}')
    with pytest.raises(BatchRecordError, match=r"summary\.json is damaged \(batch_id: Field required; model: Field"):
        load_summary(paths)


def test_the_stages_after_batch_input_fail_for_good_with_the_reason_the_manifest_cannot_be_used(paths: BatchPaths):
    with pytest.raises(Failure, match="batch_input has not been materialised") as missing:
        input_manifest(paths)
    paths.manifest.parent.mkdir(parents=True)
    paths.manifest.write_text("{")
    with pytest.raises(Failure, match=r"manifest\.json is damaged .*materialise batch_input again") as damaged:
        input_manifest(paths)
    assert not missing.value.allow_retries and not damaged.value.allow_retries
    save_manifest(paths, MANIFEST)
    assert input_manifest(paths) == MANIFEST


def test_records_on_an_object_store_root_are_read_and_written_alike():
    pytest.importorskip("upath")
    paths = BatchStorage(data_dir="memory://records-test/data").batch("b1")
    assert load_manifest(paths) is None
    save_manifest(paths, MANIFEST)
    save_summary(paths, SUMMARY)
    assert load_manifest(paths) == MANIFEST and load_summary(paths) == SUMMARY
    paths.summary.write_text("not json")
    with pytest.raises(BatchRecordError, match=r"memory://.*summary\.json is damaged"):
        load_summary(paths)
