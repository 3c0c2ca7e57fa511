"""The queue: a ticket that cannot be launched is set aside with a reason; every other ticket still launches."""

from __future__ import annotations

import json

import pytest
from dagster import build_sensor_context

from batch_pipeline.domain.settings import Settings, get_settings
from batch_pipeline.entrypoints.api.service import BatchService
from tests.support.files import REPO, write_jsonl

LINES = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
          "body": {"model": "tiny-llama", "prompt": f"p{i}", "max_tokens": 2}} for i in range(3)]


@pytest.fixture
def service(tmp_path, tiny_model, sqlite_instance, monkeypatch):
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  tiny-llama:\n    path: {tiny_model}\n")
    monkeypatch.setenv("VBATCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("VBATCH_HOME", str(REPO))
    get_settings.cache_clear()
    yield BatchService(Settings(home=REPO, data_dir=tmp_path / "data", models_file=models), sqlite_instance)
    get_settings.cache_clear()


def test_a_ticket_whose_partition_was_deleted_is_set_aside_and_the_rest_launch(service, tmp_path):
    from batch_pipeline.orchestration.sensors import queued_batches

    gone = service.submit_file(write_jsonl(tmp_path / "gone.jsonl", LINES), "tiny-llama", batch_id="gone")
    kept = service.submit_file(write_jsonl(tmp_path / "kept.jsonl", LINES[:2]), "tiny-llama", batch_id="kept")
    service.instance.delete_dynamic_partition("batches", gone.id)  # what "Delete partition" in the UI does

    result = queued_batches(build_sensor_context(instance=service.instance))
    assert [request.partition_key for request in result.run_requests] == ["kept"]

    described = service.describe("gone")
    assert described.status == "failed" and described.errors.data[0].code == "batch_not_launched"
    assert "partition no longer exists" in described.errors.data[0].message
    queue = service.data_dir / "queue"
    assert [p.name for p in queue.glob("*.json")] == [json.loads(p.read_text())["ticket"] + ".json"
                                                      for p in queue.glob("kept.*.json")]
    assert len(list((queue / "set-aside").glob("gone.*.reason.txt"))) == 1
    # The next tick does not trip over it again.
    again = queued_batches(build_sensor_context(instance=service.instance))
    assert [request.partition_key for request in again.run_requests] == ["kept"]
    assert service.describe(kept.id).status == "validating"
