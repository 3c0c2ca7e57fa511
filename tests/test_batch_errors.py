"""Whole-batch failures in OpenAI's shape, `errors = {"object": "list", "data": [{code, line, message, param}]}`,
from a real batch_input run on a real (SQLite) instance; no engine is needed, the run stops before it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dagster import materialize

from assets.batch_input import batch_input
from batch_pipeline.domain.batches import load_manifest
from batch_pipeline.domain.inbox import list_inbox, take
from batch_pipeline.domain.intake import register
from batch_pipeline.domain.models import ServedModel
from batch_pipeline.domain.status import ChunkStats, derive_batch, read_facts
from resources.storage import BatchStorage


def _describe(settings, instance, batch_id: str):
    storage = BatchStorage(data_dir=str(settings.resolved_data_dir))
    result = materialize([batch_input], partition_key=batch_id, instance=instance, raise_on_error=False,
                         resources={"storage": storage})
    facts = read_facts(instance, storage.batch(batch_id), settings.resolved_data_dir, ChunkStats())
    return result, derive_batch(facts, time.time())


def _chat(custom_id: str, model: str = "tiny-llama") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]}}


def _register(settings, instance, tiny_model: Path, path: Path, batch_id: str) -> None:
    register(settings, instance, path, ServedModel(name="tiny-llama", model=str(tiny_model)), source="cli",
             batch_id=batch_id)


def test_a_file_with_no_valid_line_fails_listing_each_line(settings, sqlite_instance, tiny_model, tmp_path):
    path = tmp_path / "bad.jsonl"
    get = dict(_chat("g"), method="GET")
    lines = ["{not json", "", json.dumps([1]), json.dumps(get), json.dumps(_chat("m", "other-model")),
             json.dumps(dict(_chat("x"), url="/v1/images"))]
    path.write_text("\n".join(lines) + "\n")
    _register(settings, sqlite_instance, tiny_model, path, "no-valid")
    result, batch = _describe(settings, sqlite_instance, "no-valid")
    assert not result.success
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None and batch.errors.object == "list"
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (1, "invalid_json"), (3, "invalid_request"), (4, "invalid_method"), (5, "model_mismatch"), (6, "invalid_url")]
    assert all(e.message for e in batch.errors.data)

    from openai.types import Batch

    assert Batch.model_validate(batch.model_dump()).errors.data[2].line == 4  # the official type reads it


def test_a_file_with_one_valid_line_passes_intake_and_keeps_the_others_as_line_errors(settings, sqlite_instance,
                                                                                      tiny_model, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(["{not json", json.dumps(_chat("ok")), json.dumps(_chat("ok"))]) + "\n")
    _register(settings, sqlite_instance, tiny_model, path, "mixed")
    result, batch = _describe(settings, sqlite_instance, "mixed")
    # Not a whole-batch failure: the valid line goes on to the engine (not run here), the two bad ones become
    # error records of their lines.
    assert result.success and batch.status != "failed" and batch.errors is None
    manifest = load_manifest(BatchStorage(data_dir=str(settings.resolved_data_dir)).batch("mixed"))
    assert manifest is not None
    assert (manifest.valid_requests, manifest.invalid_lines, manifest.num_chunks) == (1, 2, 1)


def test_an_empty_file_and_an_inbox_file_naming_two_models_fail_with_their_codes(settings, sqlite_instance,
                                                                                tiny_model, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    _register(settings, sqlite_instance, tiny_model, empty, "empty")
    _, batch = _describe(settings, sqlite_instance, "empty")
    assert batch.status == "failed"
    assert [(e.code, e.line) for e in batch.errors.data] == [("empty_file", None)]

    inbox = settings.resolved_inbox_dir
    inbox.mkdir(parents=True)
    (inbox / "two.jsonl").write_text(json.dumps(_chat("a")) + "\n" + json.dumps(_chat("b", "other")) + "\n")
    intake = take(list_inbox(inbox)[0], settings, sqlite_instance)
    assert intake.spec.rejected and intake.spec.rejected_code == "model_mismatch"
    _, batch = _describe(settings, sqlite_instance, intake.spec.batch_id)
    assert batch.status == "failed"
    assert [e.code for e in batch.errors.data] == ["model_mismatch"]
    assert "mixes models" in batch.errors.data[0].message
