"""OpenAI fidelity through the official client against the live stack: usage with cached tokens, file
expiry and its sweep, whole-batch validation errors, and partial results of a running batch."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.api_stack import API_KEY, TERMINAL, Stack, chat_text, poll
from tests.support.request_lines import LONG_PROMPT, MODEL_NAME
from tests.support.waiting import wait_for


def _upload(client: openai.OpenAI, path: Path, lines: list[str], **kwargs):
    path.write_text("\n".join(lines) + "\n")
    return client.files.create(file=path.open("rb"), purpose="batch", **kwargs)


def _gone(call) -> bool:
    try:
        call()
    except openai.NotFoundError:
        return True
    return False


def test_usage_with_cached_tokens_and_output_expiry_reach_the_official_client(stack: Stack, client: openai.OpenAI,
                                                                              tmp_path: Path):
    lines = [chat_text(f"p-{i}", LONG_PROMPT + f"Question {i}: what is {i} + {i}?") for i in range(12)]
    lines.append("{not json")  # so that the batch has an error file too
    uploaded = _upload(client, tmp_path / "prefix.jsonl", lines,
                       expires_after={"anchor": "created_at", "seconds": 3600})
    assert uploaded.expires_at == uploaded.created_at + 3600
    assert client.files.retrieve(uploaded.id).expires_at == uploaded.expires_at
    keep = _upload(client, tmp_path / "keep.jsonl", [chat_text("k", "keep me")])
    assert keep.expires_at is None

    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h",
                                  output_expires_after={"anchor": "created_at", "seconds": 7200})
    done, _ = poll(client, batch.id, TERMINAL, timeout=300)
    assert done.status == "completed", (done.errors, stack.log("daemon"))
    assert done.model == MODEL_NAME

    output = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    per_line = [o["response"]["body"]["usage"] for o in output]
    usage = done.usage
    assert usage.input_tokens == sum(u["prompt_tokens"] for u in per_line)
    assert usage.output_tokens == sum(u["completion_tokens"] for u in per_line)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in per_line)
    assert usage.input_tokens_details.cached_tokens == cached
    print(f"cached_tokens={cached} of input_tokens={usage.input_tokens}")
    assert cached > 0, "no request found the shared prefix in vLLM's prefix cache"
    # The official client's Batch type reads the same number.
    assert client.batches.retrieve(batch.id).usage.input_tokens_details.cached_tokens == cached

    for file_id in (done.output_file_id, done.error_file_id):
        result_file = client.files.retrieve(file_id)
        assert result_file.purpose == "batch_output" and result_file.expires_at == result_file.created_at + 7200

    # The sweep deletes nothing before its time: move both expiries into the past in the store (as if
    # the hours had passed) and wait for the server's timer to delete them.
    files = stack.data_dir / "files"
    for file_id in (uploaded.id, done.output_file_id, done.error_file_id):
        record = json.loads((files / file_id / "file.json").read_text())
        record["file"]["expires_at"] = int(time.time()) - 1
        (files / file_id / "file.json").write_text(json.dumps(record))
    swept = (uploaded.id, done.output_file_id, done.error_file_id)
    wait_for(lambda: not any((files / file_id / "file.json").exists() for file_id in swept), 60,
                "the expiry sweep")
    for file_id in swept:
        with pytest.raises(openai.NotFoundError) as caught:
            client.files.retrieve(file_id)
        assert "expired" in caught.value.body["message"]
        assert _gone(lambda file_id=file_id: client.files.content(file_id))
    assert not (files / uploaded.id / "content").exists()
    results = stack.data_dir / "batches" / batch.id / "results"
    assert not (results / "output.jsonl").exists() and not (results / "errors.jsonl").exists()
    assert (results / "summary.json").exists()  # only the expired files go
    after = client.batches.retrieve(batch.id)  # the ids stay, as OpenAI's do
    assert (after.status, after.output_file_id, after.error_file_id) == ("completed", done.output_file_id,
                                                                         done.error_file_id)
    listed = {f.id for f in client.files.list()}
    assert keep.id in listed and uploaded.id not in listed and done.output_file_id not in listed
    assert client.files.content(keep.id).text.startswith('{"custom_id": "k"')


def test_expiry_policies_out_of_range_or_with_another_anchor_answer_400(client: openai.OpenAI, tmp_path: Path):
    path = tmp_path / "one.jsonl"
    for policy in ({"anchor": "created_at", "seconds": 3599}, {"anchor": "created_at", "seconds": 2592001},
                   {"anchor": "last_active_at", "seconds": 3600}):
        with pytest.raises(openai.BadRequestError) as caught:
            _upload(client, path, [chat_text("a", "b")], expires_after=policy)  # type: ignore[arg-type]
        assert caught.value.body["param"] == "expires_after" and caught.value.body["type"] == "invalid_request_error"
    file_id = _upload(client, path, [chat_text("a", "b")]).id
    for policy in ({"anchor": "created_at", "seconds": 60}, {"anchor": "created_at", "seconds": 2592001},
                   {"anchor": "expires_at", "seconds": 3600}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                                  output_expires_after=policy)  # type: ignore[arg-type]
        assert caught.value.body["param"] == "output_expires_after" and caught.value.body["code"] == "invalid_value"


def test_a_batch_with_no_valid_line_fails_with_each_lines_error(stack: Stack, client: openai.OpenAI, tmp_path: Path):
    get_line = json.loads(chat_text("g", "hello"))
    get_line["method"] = "GET"
    # The first line is a JSON object: an upload whose first line is not is refused at once (400 invalid_file).
    lines = [json.dumps(get_line), "{not json", "[1, 2]", chat_text("d", "x").replace('"custom_id": "d"', '"custom_id": ""')]
    uploaded = _upload(client, tmp_path / "bad.jsonl", lines)
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    failed, _ = poll(client, batch.id, TERMINAL, timeout=180)
    assert failed.status == "failed", (failed, stack.log("daemon"))
    assert failed.failed_at is not None and failed.output_file_id is None
    assert failed.errors is not None and failed.errors.object == "list"
    assert [(e.line, e.code) for e in failed.errors.data] == [
        (1, "invalid_method"), (2, "invalid_json"), (3, "invalid_request"), (4, "missing_custom_id")]
    assert all(e.message for e in failed.errors.data)


def test_partial_results_of_a_running_batch_are_a_prefix_of_the_final_output(stack: Stack, client: openai.OpenAI,
                                                                             tmp_path: Path):
    # Later lines ask for more tokens, so chunks finish one after another while the batch runs.
    lines = []
    for i in range(40):
        line = json.loads(chat_text(f"r-{i:02d}", f"Count to {i}", max_tokens=24 + 16 * i))
        line["body"]["ignore_eos"] = True
        lines.append(json.dumps(line))
    uploaded = _upload(client, tmp_path / "growing.jsonl", lines)
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    url = f"{stack.base_url}/batches/{batch.id}/output"
    headers = {"Authorization": f"Bearer {API_KEY}"}

    assert httpx.get(url, headers=headers).json()["error"]["code"] == "batch_not_finished"
    snapshots: list[tuple[str, list[str]]] = []  # (status after the read, lines)
    cli_lines: list[str] | None = None
    deadline = time.time() + 300
    while time.time() < deadline:
        response = httpx.get(url, params={"partial": "true"}, headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        status = client.batches.retrieve(batch.id).status
        snapshots.append((status, response.text.splitlines(keepends=True)))
        if status == "in_progress" and snapshots[-1][1] and cli_lines is None:
            cli = stack.cli("results", batch.id, "--partial")
            assert cli.returncode == 0, cli.stderr
            cli_lines = cli.stdout.splitlines(keepends=True)
        if status in TERMINAL:
            break
    assert status == "completed", stack.log("daemon")

    final = client.files.content(client.batches.retrieve(batch.id).output_file_id).text.splitlines(keepends=True)
    assert len(final) == 40 and len(set(final)) == 40
    for _, seen in snapshots + ([("cli", cli_lines)] if cli_lines is not None else []):
        assert seen == final[:len(seen)]  # in input order, never a line twice, byte for byte the final lines
    running = [seen for status, seen in snapshots if status == "in_progress"]
    assert any(0 < len(seen) < 40 for seen in running), [len(s) for _, s in snapshots]
    assert httpx.get(url, params={"partial": "true"}, headers=headers).text.splitlines(keepends=True) == final
    cli = stack.cli("results", batch.id, "--partial")
    assert cli.returncode == 0 and cli.stdout.splitlines(keepends=True) == final
