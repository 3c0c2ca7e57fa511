"""The Batch API driven by the official `openai` client against a live server and daemon (real vLLM, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from openai.types import Batch, FileObject

from tests.support.api_stack import ADMIN_KEY, API_KEY, MAX_UPLOAD_BYTES, TERMINAL, Stack, chat_text, poll
from tests.support.files import REPO
from tests.support.request_lines import MODEL_NAME


def test_official_client_runs_a_batch_end_to_end(stack: Stack, client: openai.OpenAI, tmp_path):
    lines = [chat_text(f"req-{i}", f"Tell me about item {i}") for i in range(10)]
    lines.insert(3, "{not json")
    lines.append(chat_text("req-1", "a duplicate custom_id"))
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(lines) + "\n")

    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    assert FileObject.model_validate(uploaded.model_dump()).purpose == "batch"
    assert uploaded.bytes == path.stat().st_size and uploaded.filename == "batch.jsonl"
    assert client.files.content(uploaded.id).content == path.read_bytes()

    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"purpose": "e2e"})
    assert batch.status == "validating" and batch.model == MODEL_NAME and batch.metadata == {"purpose": "e2e"}
    assert batch.expires_at == batch.created_at + 24 * 3600

    # The CLI follows the same batch with its progress bar while the client polls.
    watcher = subprocess.Popen([sys.executable, "-m", "batch_pipeline.entrypoints.cli", "status", batch.id, "--wait",
                                "--interval", "1", "--json"], cwd=REPO, env=stack.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        done, seen = poll(client, batch.id, TERMINAL, timeout=300)
        watched_out, watched_err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()

    assert done.status == "completed", (done.errors, stack.log("daemon"))
    assert seen[0] == "validating" and seen[-1] == "completed"
    assert done.request_counts.total == 12 and done.request_counts.completed == 10
    assert done.request_counts.failed == 2
    assert done.usage.output_tokens > 0 and done.usage.input_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at

    output = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in output] == [f"req-{i}" for i in range(10)]
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in output)
    assert sum(o["response"]["body"]["usage"]["completion_tokens"] for o in output) == done.usage.output_tokens
    errors = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
    assert [(e["error"]["line"], e["error"]["code"]) for e in errors] == [(4, "invalid_json"),
                                                                          (12, "duplicate_custom_id")]
    for file_id in (done.output_file_id, done.error_file_id):
        assert client.files.retrieve(file_id).purpose == "batch_output"

    assert watcher.returncode == 0, watched_err
    assert json.loads(watched_out)["status"] == "completed"
    # The ETA shows only while chunks are left after the first one written (a poll may miss that moment).
    assert "/12 requests" in watched_err and "tok/s" in watched_err, watched_err

    # The run that did the work is in the instance, tagged with the batch it ran.
    from dagster import DagsterInstance, RunsFilter

    with DagsterInstance.from_config(stack.env["DAGSTER_HOME"]) as instance:
        runs = instance.get_run_records(RunsFilter(tags={"vllm_batch/batch_id": batch.id}))
    assert len(runs) == 1 and runs[0].dagster_run.is_success

    cli = stack.cli("results", batch.id)
    assert cli.returncode == 0 and [json.loads(x)["custom_id"] for x in cli.stdout.splitlines()] == \
        [o["custom_id"] for o in output]


def test_cancel_stops_the_running_batch_and_keeps_an_error_per_request(stack: Stack, client: openai.OpenAI, tmp_path,
                                                                       request):
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(chat_text(f"long-{i}", f"Item {i}", max_tokens=200) for i in range(40)) + "\n")
    hold = Path(stack.env["VBATCH_TEST_HOLD_FILE"])  # the step waits after each chunk until it is cancelled
    hold.touch()
    request.addfinalizer(lambda: hold.unlink(missing_ok=True))
    batch = client.batches.create(input_file_id=client.files.create(file=path.open("rb"), purpose="batch").id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    running, _ = poll(client, batch.id, {"in_progress", "finalizing"} | TERMINAL, timeout=240)
    assert running.status == "in_progress", running

    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    cancelled, _ = poll(client, batch.id, TERMINAL, timeout=240)
    assert cancelled.status == "cancelled", (cancelled, stack.log("daemon"))
    assert cancelled.cancelled_at >= cancelled.cancelling_at

    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    with DagsterInstance.from_config(stack.env["DAGSTER_HOME"]) as instance:
        runs = instance.get_run_records(RunsFilter(tags={"vllm_batch/batch_id": batch.id}))
    assert [r.dagster_run.status for r in runs] == [DagsterRunStatus.CANCELED]

    counts = cancelled.request_counts
    assert counts.total == 40 and counts.completed + counts.failed == 40
    errors = [json.loads(line) for line in client.files.content(cancelled.error_file_id).text.splitlines()]
    assert len(errors) == counts.failed and {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    done_ids = set()
    if cancelled.output_file_id:
        output = client.files.content(cancelled.output_file_id).text
        done_ids = {json.loads(line)["custom_id"] for line in output.splitlines()}
    assert done_ids | {e["custom_id"] for e in errors} == {f"long-{i}" for i in range(40)}

    again = client.batches.cancel(batch.id)  # cancelling twice is harmless
    assert again.status == "cancelled"


def test_batches_created_elsewhere_are_listed_and_pages_follow_the_cursor(stack: Stack, tiny_model):
    # A batch registered the way the UI or `vllm-batch run` do: a partition and a spec, nothing from the API.
    # It belongs to no tenant, so an admin key sees it (tests/api/test_tenancy.py: other keys do not).
    client = openai.OpenAI(base_url=stack.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=60)
    from dagster import DagsterInstance

    from batch_pipeline.domain.settings import Settings
    from batch_pipeline.entrypoints.local_run import register_local_batch

    settings = Settings(home=REPO, data_dir=stack.data_dir)
    with DagsterInstance.from_config(stack.env["DAGSTER_HOME"]) as instance:
        for batch_id in ("from-elsewhere", "from-elsewhere-2", "from-elsewhere-3"):
            register_local_batch(settings, instance, REPO / "tests" / "api" / "data" / "three.jsonl",
                                 str(tiny_model), MODEL_NAME, batch_id=batch_id, source="ui")
    elsewhere = client.batches.retrieve("from-elsewhere")
    assert elsewhere.status == "validating" and elsewhere.endpoint == "/v1/completions"
    assert client.files.content(elsewhere.input_file_id).content == (REPO / "tests/api/data/three.jsonl").read_bytes()

    every = [b.id for b in client.batches.list(limit=100).data]
    assert "from-elsewhere" in every and len(every) >= 3
    first = client.batches.list(limit=1)
    assert first.has_more and len(first.data) == 1
    second = client.batches.list(limit=1, after=first.data[0].id)
    assert [first.data[0].id, second.data[0].id] == every[:2]
    paged = [b.id for b in client.batches.list(limit=1)]  # the client follows `after` by itself
    assert paged == every
    for batch in client.batches.list(limit=100).data:
        Batch.model_validate(batch.model_dump())


def test_models_lists_the_configured_models(client: openai.OpenAI):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_every_route_needs_a_valid_key(stack: Stack):
    routes = [("GET", "/files"), ("POST", "/files"), ("GET", "/files/file-0123456789abcdef01234567"),
              ("GET", "/files/file-0123456789abcdef01234567/content"),
              ("DELETE", "/files/file-0123456789abcdef01234567"), ("GET", "/batches"), ("POST", "/batches"),
              ("GET", "/batches/batch_x"), ("POST", "/batches/batch_x/cancel"), ("GET", "/models"),
              ("GET", "/no-such-route")]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
                    {"Authorization": "Bearer"}):
        for method, route in routes:
            response = httpx.request(method, stack.base_url + route, headers=headers)
            assert response.status_code == 401, (method, route, headers)
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
            assert API_KEY not in response.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.base_url, api_key="wrong", max_retries=0).batches.list()
    assert API_KEY not in stack.log("server") + stack.log("daemon")


def test_unknown_ids_answer_404_in_the_openai_error_shape(client: openai.OpenAI):
    for call in (lambda: client.batches.retrieve("batch_doesnotexist"),
                 lambda: client.batches.cancel("batch_doesnotexist"),
                 lambda: client.batches.retrieve("..%2F..%2Fetc"),
                 lambda: client.files.retrieve("file-0123456789abcdef01234567"),
                 lambda: client.files.content("file-0123456789abcdef01234567"),
                 lambda: client.files.retrieve("../../etc/passwd"),
                 lambda: client.files.delete("file-0123456789abcdef01234567")):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.body["code"] == "not_found" and caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(input_file_id="file-0123456789abcdef01234567", endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert caught.value.body["param"] == "input_file_id"


def test_uploads_over_the_limit_answer_413_and_keep_nothing(stack: Stack, client: openai.OpenAI, tmp_path):
    before = {f.id for f in client.files.list()}
    big = tmp_path / "big.jsonl"
    line = chat_text("x", "y" * 1000) + "\n"
    big.write_text(line * (MAX_UPLOAD_BYTES // len(line) + 2))
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=big.open("rb"), purpose="batch")
    assert caught.value.status_code == 413 and caught.value.body["code"] == "file_too_large"

    # A body that does not announce its length is cut off at the limit while it streams.
    boundary = "b0undary"

    def chunks():
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
               f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n').encode()
        for _ in range(MAX_UPLOAD_BYTES // 4096 + 2):
            yield b"x" * 4096
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(stack.base_url + "/files", content=chunks(), timeout=30, headers={
        "Authorization": f"Bearer {API_KEY}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"
    assert {f.id for f in client.files.list()} == before
    assert not any((stack.data_dir / "files" / ".uploads").iterdir())


def test_bad_requests_answer_400_or_422(stack: Stack, client: openai.OpenAI, tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(chat_text("a", "b") + "\n")
    file_id = client.files.create(file=path.open("rb"), purpose="batch").id
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    assert caught.value.body["param"] == "endpoint"  # the file's lines are chat requests
    with pytest.raises(openai.UnprocessableEntityError):
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="forever")
    with pytest.raises(openai.UnprocessableEntityError):
        client.batches.create(input_file_id=file_id, endpoint="/v1/images", completion_window="24h")  # type: ignore
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=path.open("rb"), purpose="fine-tune")
    assert caught.value.body["param"] == "purpose"
    other = tmp_path / "other.jsonl"
    other.write_text(chat_text("a", "b").replace(MODEL_NAME, "no-such-model") + "\n")
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(input_file_id=client.files.create(file=other.open("rb"), purpose="batch").id,
                              endpoint="/v1/chat/completions", completion_window="24h")
    assert caught.value.body["code"] == "model_not_found"

    deleted = client.files.delete(file_id)
    assert deleted.deleted and deleted.id == file_id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)
