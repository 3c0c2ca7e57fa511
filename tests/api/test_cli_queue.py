"""The queue commands of `vllm-batch` and the completion window, on a real instance with no daemon running."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.api_stack import Stack
from tests.support.files import REPO
from tests.support.request_lines import MODEL_NAME

THREE = REPO / "tests" / "api" / "data" / "three.jsonl"


@pytest.mark.parametrize("command", ["submit", "status", "list", "results", "cancel", "serve", "run", "replay"])
def test_every_command_has_help(offline: Stack, command: str):
    result = offline.cli(command, "--help")
    assert result.returncode == 0 and "Usage: " in result.stdout and "--json" in result.stdout


def test_submit_queues_a_ticket_that_cancel_clears(offline: Stack):
    submitted = offline.cli("submit", str(THREE), "--model", MODEL_NAME, "--metadata", "team=search", "--json")
    assert submitted.returncode == 0, submitted.stderr
    batch = json.loads(submitted.stdout)
    assert batch["status"] == "validating" and batch["metadata"] == {"team": "search"}
    assert batch["endpoint"] == "/v1/completions" and batch["model"] == MODEL_NAME
    tickets = list((offline.data_dir / "queue").glob("*.json"))
    assert [json.loads(t.read_text())["batch_id"] for t in tickets] == [batch["id"]]

    again = offline.cli("submit", str(THREE), "--model", MODEL_NAME)
    assert again.returncode == 1 and again.stderr.strip() == f"error: batch {batch['id']} is already queued or running"

    listed = json.loads(offline.cli("list", "--json").stdout)
    assert [b["id"] for b in listed["data"]] == [batch["id"]] and listed["has_more"] is False
    assert batch["id"] in offline.cli("list").stdout

    cancelled = offline.cli("cancel", batch["id"], "--json")
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["status"] == "cancelled"
    assert not list((offline.data_dir / "queue").glob("*.json"))  # the daemon will never launch it
    status = offline.cli("status", batch["id"])
    assert status.returncode == 0 and status.stdout.startswith(f"{batch['id']}  cancelled")

    results = offline.cli("results", batch["id"])
    assert results.returncode == 1 and results.stderr.count("\n") == 1 and "has no output file" in results.stderr

    resubmitted = offline.cli("submit", str(THREE), "--model", MODEL_NAME, "--json")
    assert resubmitted.returncode == 0 and json.loads(resubmitted.stdout)["status"] == "validating"


@pytest.mark.parametrize("args, message", [
    (["status", "nope"], "error: no batch with id 'nope'"),
    (["status", "../../etc"], "error: no batch with id '../../etc'"),
    (["cancel", "nope"], "error: no batch with id 'nope'"),
    (["results", "nope", "-o", "x.jsonl"], "error: no batch with id 'nope'"),
    (["submit", str(THREE), "--model", "no-such-model"],
     "error: unknown model 'no-such-model' (served models: tiny-llama)"),
    (["submit", "missing.jsonl", "--model", MODEL_NAME], f"error: input file not found: {REPO / 'missing.jsonl'}"),
    (["submit", str(THREE), "--model", MODEL_NAME, "--metadata", "novalue"],
     "error: --metadata takes KEY=VALUE, got 'novalue'"),
    (["list", "--after", "nope"], "error: no batch with id 'nope'"),
])
def test_failures_are_one_line_and_exit_1(offline: Stack, args: list[str], message: str):
    result = offline.cli(*args)
    assert result.returncode == 1 and result.stderr == message + "\n" and result.stdout == ""


def test_serve_refuses_to_start_without_api_keys(offline: Stack):
    offline.env.pop("VBATCH_API_KEYS")
    offline.env.pop("VBATCH_ADMIN_API_KEYS")
    result = offline.cli("serve", "--port", "1")
    assert result.returncode == 1 and result.stderr.startswith("error: no API keys configured")


def test_a_closed_completion_window_expires_the_batch_with_an_error_per_request(offline: Stack, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch):
    from dagster import DagsterInstance, materialize

    from assets import batch_input
    from batch_pipeline.domain import stopping
    from batch_pipeline.domain.settings import Settings
    from batch_pipeline.entrypoints.api.service import BatchService
    from resources.storage import BatchStorage

    settings = Settings(home=REPO, data_dir=offline.data_dir, models_file=Path(offline.env["VBATCH_MODELS_FILE"]),
                        chunk_size=2)
    with DagsterInstance.from_config(offline.env["DAGSTER_HOME"]) as instance:
        service = BatchService(settings, instance)
        upload = service.files.upload_path()
        upload.write_bytes(THREE.read_bytes())
        file = service.files.adopt(upload, "three.jsonl", "batch")
        batch = service.create(file.id, "/v1/completions", "1h")
        assert batch.expires_at - batch.created_at in (3600, 3601)
        # Validate it (no engine needed for this stage), as the daemon's run would have started to.
        assert materialize([batch_input], partition_key=batch.id, instance=instance,
                           resources={"storage": BatchStorage(data_dir=str(offline.data_dir))}).success
        assert service.describe(batch.id).status == "validating"
        # The window closes: the expiry check runs an hour and a second later (its clock, not the test's wait).
        monkeypatch.setattr(stopping, "time", SimpleNamespace(time=lambda: batch.expires_at + 1))
        service.enforce_stops()
        monkeypatch.undo()
        expired = service.describe(batch.id)
        assert expired.status == "expired" and expired.expired_at >= batch.expires_at
        assert expired.request_counts.model_dump() == {"total": 3, "completed": 0, "failed": 3}
        assert not list((offline.data_dir / "queue").glob("*.json"))
        errors = [json.loads(x) for x in service.files.content_path(expired.error_file_id).read_text().splitlines()]
        assert [(e["custom_id"], e["error"]["code"], e["error"]["line"]) for e in errors] == \
            [("c0", "batch_expired", 1), ("c1", "batch_expired", 2), ("c2", "batch_expired", 3)]
        assert expired.output_file_id is None  # nothing finished before the window closed
