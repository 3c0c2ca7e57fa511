"""`GET /v1/batches` describes each batch exactly as `GET /v1/batches/{id}` does, in every state.

The list reads its page's batches together (batch_pipeline/domain/status.py: read_many_facts), the single
route one at a time; this checks, through the official client, that both give the same object.
Real parts: the app served in-process (the client's own HTTP stack over Starlette's test transport),
a real SQLite instance, real runs of batch_job (the tiny model's engine) and of batch_input.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest
import yaml
from dagster import materialize
from starlette.testclient import TestClient

from assets.batch_input import batch_input
from batch_pipeline.domain.batches import load_submission
from batch_pipeline.domain.constants import RUN_KEY_TAG
from batch_pipeline.domain.settings import Settings
from batch_pipeline.entrypoints.api.app import create_app
from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process
from resources.storage import BatchStorage
from tests.support.files import REPO
from tests.support.request_lines import MODEL_NAME

KEY = "list-test-key-5e1f0a2b"
ADMIN = "list-test-admin-9c4d7b13"  # sees batches of no tenant too (from the UI)


def _lines(prefix: str, count: int, method: str = "POST") -> bytes:
    return "".join(json.dumps({"custom_id": f"{prefix}-{i}", "method": method, "url": "/v1/completions",
                               "body": {"model": MODEL_NAME, "prompt": f"item {i}", "max_tokens": 3,
                                        "temperature": 0}}) + "\n" for i in range(count)).encode()


@pytest.fixture
def api(tmp_path: Path, tiny_model: Path):
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"models": {MODEL_NAME: {"path": str(tiny_model)}}}))
    settings = Settings(home=REPO, data_dir=tmp_path / "data", dagster_home=tmp_path / "dagster", dtype="float32",
                        max_model_len=1024, enforce_eager=True, chunk_size=2, keep_engine_loaded=True, engine_host=False,
                        models_file=models, api_keys=KEY, admin_api_keys=ADMIN)
    with TestClient(create_app(settings), base_url="http://api.test") as http:
        client = openai.OpenAI(base_url="http://api.test/v1", api_key=KEY, http_client=http, max_retries=0)
        admin = openai.OpenAI(base_url="http://api.test/v1", api_key=ADMIN, http_client=http, max_retries=0)
        yield settings, http.app.state.service, client, admin  # type: ignore[attr-defined]


def _create(client: openai.OpenAI, content: bytes, window: str = "24h") -> str:
    uploaded = client.files.create(file=("in.jsonl", content), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                 completion_window=window).id  # type: ignore[arg-type]


def _launched_tags(service, batch_id: str) -> dict[str, str]:
    # What the queued_batches sensor's run carries: the ticket as its run key (the ticket then counts as launched).
    submission = load_submission(service.storage.batch(batch_id))
    assert submission is not None and submission.ticket
    return {RUN_KEY_TAG: submission.ticket}


def test_every_listed_batch_is_the_batch_its_own_route_returns(api, loaded_engine, tiny_model: Path):
    settings, service, client, admin = api
    instance = service.instance
    expected: dict[str, str] = {}

    expected[_create(client, _lines("queued", 3))] = "validating"
    cancelled = _create(client, _lines("cancelled", 3))
    assert client.batches.cancel(cancelled).status == "cancelled"
    expected[cancelled] = "cancelled"

    expiring = _create(client, _lines("expiring", 3), window="1s")
    deadline = time.monotonic() + 30
    while client.batches.retrieve(expiring).status != "expired":  # closed window; the sweep writes its results
        assert time.monotonic() < deadline, "the 1 s window never expired"
        service.enforce_stops()
        time.sleep(0.2)
    expected[expiring] = "expired"

    failed = _create(client, _lines("get", 3, method="GET"))  # no line is valid
    result = materialize([batch_input], partition_key=failed, instance=instance, raise_on_error=False,
                         resources={"storage": BatchStorage(data_dir=settings.data_root)},
                         tags=_launched_tags(service, failed))
    assert not result.success
    expected[failed] = "failed"

    completed = _create(client, _lines("done", 5))
    run = run_batch_in_process(settings, instance, completed, tags=_launched_tags(service, completed))
    assert run.success, run.error
    expected[completed] = "completed"

    # Registered the way the UI and `vllm-batch run` do: no submission, its input file registered on reading.
    spec = register_local_batch(settings, instance, REPO / "tests" / "api" / "data" / "three.jsonl",
                                str(tiny_model), MODEL_NAME, batch_id="from-the-ui", source="ui")
    expected[spec.batch_id] = "validating"

    singles = {batch_id: admin.batches.retrieve(batch_id) for batch_id in expected}
    assert {batch_id: batch.status for batch_id, batch in singles.items()} == expected
    # Pages of 2 and one page of all: the same objects, field for field, as the single route's.
    for limit in (2, 100):
        listed = {batch.id: batch for batch in admin.batches.list(limit=limit)}
        assert set(listed) == set(singles)
        for batch_id, single in singles.items():
            assert listed[batch_id].model_dump() == single.model_dump(), batch_id
    finished = singles[completed]
    assert finished.output_file_id and finished.request_counts is not None
    assert finished.request_counts.completed == 5 and finished.in_progress_at and finished.completed_at
    assert singles[failed].errors is not None and len(singles[failed].errors.data or []) == 3
    assert singles[expiring].expired_at and singles[cancelled].cancelled_at
    assert singles["from-the-ui"].input_file_id
