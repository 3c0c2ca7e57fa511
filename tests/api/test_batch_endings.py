"""How batches end through the API, driven by the official client: expired while running, failed, not cancellable.

Against the session's live stack (tests/api/conftest.py: a real daemon, `vllm-batch serve`, the tiny model).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import yaml

from tests.support.api_stack import TERMINAL, Stack, chat_text, poll
from tests.support.files import REPO
from tests.support.request_lines import MODEL_NAME

pytestmark = pytest.mark.timeout(600)


def upload(client: openai.OpenAI, path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    with path.open("rb") as handle:
        return client.files.create(file=handle, purpose="batch").id


def dagster(stack: Stack, *args: str) -> None:
    result = subprocess.run([str(Path(sys.executable).parent / "dagster"), *args, "-w",
                             str(REPO / "workspace.yaml")], env=stack.env, cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def chunk_mtimes(stack: Stack, batch_id: str) -> dict[str, int]:
    folder = stack.data_dir / "batches" / batch_id / "chunks"
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("chunk-*.parquet"))} if folder.is_dir() else {}


def test_a_running_batch_whose_window_closes_is_expired_by_the_api_servers_sweep(stack: Stack, client: openai.OpenAI,
                                                                                 tmp_path: Path):
    from batch_pipeline.domain.batches import load_submission, save_submission
    from resources.storage import BatchStorage

    # Held after each chunk (the test-only hook) until the sweep acts: it cannot finish before the window closes,
    # on any hardware.
    total = 40
    lines = [json.dumps({"custom_id": f"exp-{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": MODEL_NAME, "prompt": f"Item {i}", "max_tokens": 8, "temperature": 0,
                                  "ignore_eos": True}}) for i in range(total)]
    file_id = upload(client, tmp_path / "long.jsonl", lines)
    hold = Path(stack.env["VBATCH_TEST_HOLD_FILE"])
    hold.touch()
    # The daemon's batch_stops sensor enforces windows too; with it stopped, only the API server's sweep can.
    dagster(stack, "sensor", "stop", "batch_stops")
    try:
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="1h")
        deadline = time.time() + 300
        while not chunk_mtimes(stack, batch.id):  # a chunk (of 4) finished; the step holds after it
            assert time.time() < deadline, stack.log("daemon")
            assert client.batches.retrieve(batch.id).status not in TERMINAL
            time.sleep(0.5)
        # Close the window now: the batch was created with an hour, move its end (as if an hour had passed).
        paths = BatchStorage(data_dir=str(stack.data_dir)).batch(batch.id)
        closes = time.time()
        save_submission(paths, load_submission(paths).model_copy(update={"expires_at": closes}))
        kept = chunk_mtimes(stack, batch.id)

        expired, seen = poll(client, batch.id, TERMINAL, timeout=120)
    finally:
        hold.unlink(missing_ok=True)
        dagster(stack, "sensor", "start", "batch_stops")

    assert expired.status == "expired", (expired, seen)
    assert expired.expired_at >= int(closes)
    counts = expired.request_counts
    assert counts.total == total and counts.completed + counts.failed == total
    assert len(kept) * 4 <= counts.completed < total  # the finished chunks are kept, the rest did not run
    after = chunk_mtimes(stack, batch.id)
    assert {name: after[name] for name in kept} == kept
    assert counts.completed == 4 * len(after)  # what completed is exactly the finished chunks (4 requests each)

    output = [json.loads(x) for x in client.files.content(expired.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in client.files.content(expired.error_file_id).text.splitlines()]
    assert len(output) == counts.completed and len(errors) == counts.failed
    assert all(o["response"]["status_code"] == 200 for o in output)
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    ids = [o["custom_id"] for o in output] + [e["custom_id"] for e in errors]
    assert sorted(ids) == sorted(f"exp-{i}" for i in range(total))  # each request once, in one file or the other

    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    with DagsterInstance.from_config(stack.env["DAGSTER_HOME"]) as instance:
        runs = instance.get_run_records(RunsFilter(tags={"vllm_batch/batch_id": batch.id}))
    assert [r.dagster_run.status for r in runs] == [DagsterRunStatus.CANCELED]


def test_cancelling_a_completed_batch_is_refused_and_changes_nothing(stack: Stack, client: openai.OpenAI,
                                                                     tmp_path: Path):
    file_id = upload(client, tmp_path / "small.jsonl", [chat_text(f"done-{i}", "Hi", max_tokens=2) for i in range(2)])
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    done, _ = poll(client, batch.id, TERMINAL, timeout=300)
    assert done.status == "completed", (done, stack.log("daemon"))
    output_before = client.files.content(done.output_file_id).content

    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.cancel(batch.id)
    assert caught.value.body["code"] == "batch_not_cancellable" and "completed" in caught.value.body["message"]
    after = client.batches.retrieve(batch.id)
    assert after.status == "completed" and after.cancelling_at is None and after.cancelled_at is None
    assert client.files.content(after.output_file_id).content == output_before


def test_a_model_that_fails_to_load_fails_the_batch_with_the_reason(stack: Stack, client: openai.OpenAI,
                                                                    tmp_path: Path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["NoSuchArchitecture"],
                                                    "model_type": "no-such-model-type"}))
    models_file = Path(stack.env["VBATCH_MODELS_FILE"])
    original = models_file.read_text()
    models = yaml.safe_load(original)
    models["models"]["broken"] = {"path": str(broken)}
    models_file.write_text(yaml.safe_dump(models))
    try:
        line = chat_text("b-0", "Hi").replace(f'"model": "{MODEL_NAME}"', '"model": "broken"')
        file_id = upload(client, tmp_path / "broken.jsonl", [line])
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        assert batch.model == "broken"
        failed, _ = poll(client, batch.id, TERMINAL, timeout=300)
    finally:
        models_file.write_text(original)
    assert failed.status == "failed", (failed, stack.log("daemon"))
    assert failed.failed_at is not None and failed.output_file_id is None
    assert [e.code for e in failed.errors.data] == ["batch_failed"]
    message = failed.errors.data[0].message
    assert message and "\n" not in message and "Traceback" not in message
    # No retry of a step that failed on its own (dagster.yaml: retry_on_asset_or_op_failure false).
    from dagster import DagsterInstance, RunsFilter

    with DagsterInstance.from_config(stack.env["DAGSTER_HOME"]) as instance:
        runs = instance.get_run_records(RunsFilter(tags={"vllm_batch/batch_id": batch.id}))
    assert len(runs) == 1


def test_a_batch_whose_input_file_was_deleted_before_it_ran_fails_as_invalid_file(stack: Stack,
                                                                                   client: openai.OpenAI,
                                                                                   tmp_path: Path):
    file_id = upload(client, tmp_path / "gone.jsonl", [chat_text("g-0", "Hi", max_tokens=2)])
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert client.files.delete(file_id).deleted  # before the daemon's run reads it (runs take seconds to start)
    failed, _ = poll(client, batch.id, TERMINAL, timeout=300)
    assert failed.status == "failed", (failed, stack.log("daemon"))
    assert [e.code for e in failed.errors.data] == ["invalid_file"]
    assert "cannot read input file" in failed.errors.data[0].message
    assert failed.output_file_id is None and failed.error_file_id is None
