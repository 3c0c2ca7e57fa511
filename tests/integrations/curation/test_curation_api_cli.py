"""A batch's curation status and training file through the real `vllm-batch serve` and `vllm-batch curation`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integrations.curation.conftest import REPO, chat_item, materialize_curation, review, review_tasks, write_batch
from tests.support.ports import free_port
from tests.support.services import VLLM_BATCH, start_process, stop_processes
from tests.support.waiting import wait_for

API_KEY = "curation-api-key-4b9e1c"


def _env(settings, curation: bool) -> dict[str, str]:
    env = {**os.environ, "DAGSTER_HOME": str(settings.dagster_home), "VBATCH_HOME": str(REPO),
           # An admin key: these batches are written without one (no tenant), which only admin keys see.
           "VBATCH_DATA_DIR": str(settings.resolved_data_dir), "VBATCH_ADMIN_API_KEYS": API_KEY,
           "VBATCH_ENABLE_CURATION": "true" if curation else "false"}
    if curation:
        env.update(VBATCH_LABEL_STUDIO_URL=settings.label_studio_url,
                   VBATCH_LABEL_STUDIO_API_KEY=settings.label_studio_api_key.get_secret_value())
    return env


class Server:
    """`vllm-batch serve` in a subprocess of its own process group."""

    def __init__(self, env: dict[str, str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process = start_process([*VLLM_BATCH, "serve", "--port", str(self.port)], env, log)

    def wait(self, timeout: float = 120) -> None:
        wait_for(lambda: httpx.get(f"{self.url}/health", timeout=2).status_code == 200, timeout,
                 "the API server to answer /health", watch=[self.process], log=self.log)

    def get(self, path: str, key: str | None = API_KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=30)

    def stop(self) -> None:
        stop_processes(self.process, timeout=20)


@pytest.fixture
def reviewed_batch(curation_settings, sqlite_instance, label_studio_server, batch_id) -> Iterator[tuple[str, str]]:
    """A batch imported into the real Label Studio and reviewed there (2 accepted, 1 corrected, 1 rejected),
    plus a second batch that curation never ran for."""
    batch, untouched = batch_id("api-reviewed"), batch_id("api-untouched")
    write_batch(curation_settings, sqlite_instance, batch, "tiny-llama",
                [chat_item(f"q{i}", f"Question {i}?", f"Answer {i}.") for i in range(5)])
    write_batch(curation_settings, sqlite_instance, untouched, "tiny-llama", [chat_item("q0", "Question?", "Answer.")])
    materialize_curation(curation_settings, sqlite_instance, batch, "curation_tasks")
    tasks = {t.data["custom_id"]: t for t in review_tasks(label_studio_server, batch)}
    client = label_studio_server.client()
    client.annotations.create(id=tasks["q0"].id, result=review("accept", 5, "Answer 0."))
    client.annotations.create(id=tasks["q1"].id, result=review("accept", 4, "Answer 1."))
    client.annotations.create(id=tasks["q2"].id, result=review("reject", 2, "A better answer 2."))
    client.annotations.create(id=tasks["q3"].id, result=review("reject", 1, "Answer 3."))
    materialize_curation(curation_settings, sqlite_instance, batch, "curation_annotations")
    yield batch, untouched


def test_curation_status_and_training_file_through_the_api_and_cli(curation_settings, reviewed_batch, tmp_path):
    batch, untouched = reviewed_batch
    training = (curation_settings.resolved_data_dir / "batches" / batch / "curation" / "training.jsonl").read_bytes()
    # Both servers start at once (curation on and off); each takes seconds to import on 2 cores.
    servers = {"on": Server(_env(curation_settings, True), tmp_path / "serve-on.log"),
               "off": Server(_env(curation_settings, False), tmp_path / "serve-off.log")}
    try:
        for server in servers.values():
            server.wait()
        on, off = servers["on"], servers["off"]

        status = on.get(f"/v1/batches/{batch}/curation")
        assert status.status_code == 200, status.text
        body = status.json()
        assert (body["batch_id"], body["tasks_imported"], body["tasks_annotated"]) == (batch, 5, 4)
        assert (body["accepted"], body["rejected"], body["corrected"], body["training_examples"]) == (2, 2, 1, 3)
        assert body["accept_rate"] == 0.5

        download = on.get(f"/v1/batches/{batch}/curation/training")
        assert download.status_code == 200 and download.content == training
        assert len(download.text.splitlines()) == 3
        assert all(json.loads(line)["messages"][-1]["role"] == "assistant" for line in download.text.splitlines())

        # Behind the same keys as every /v1 route.
        for key in (None, "wrong-key"):
            refused = on.get(f"/v1/batches/{batch}/curation", key=key)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        # An unknown batch: the same 404 as GET /v1/batches/{id}.
        core = on.get("/v1/batches/no-such-batch").json()
        for path in ("/v1/batches/no-such-batch/curation", "/v1/batches/no-such-batch/curation/training"):
            missing = on.get(path)
            assert missing.status_code == 404 and missing.json() == core
        # A batch curation has not run for.
        for path in (f"/v1/batches/{untouched}/curation", f"/v1/batches/{untouched}/curation/training"):
            not_yet = on.get(path)
            assert not_yet.status_code == 404 and not_yet.json()["error"]["code"] == "curation_not_found"
        assert "/v1/batches/{batch_id}/curation" in on.get("/openapi.json").json()["paths"]

        # Curation off: the routes do not exist.
        gone = off.get(f"/v1/batches/{batch}/curation")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
        assert "/v1/batches/{batch_id}/curation" not in off.get("/openapi.json").json()["paths"]
    finally:
        for server in servers.values():
            server.stop()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "batch_pipeline.entrypoints.cli", "curation", *args], cwd=REPO,
                              env=_env(curation_settings, True), capture_output=True, text=True, timeout=120)

    shown = cli("status", batch, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == body
    line = cli("status", batch)
    assert line.returncode == 0 and "5/5 tasks imported, 4 annotated: 2 accepted, 2 rejected, 1 corrected" in line.stdout
    printed = cli("export", batch)
    assert printed.returncode == 0 and printed.stdout.encode() == training
    target = tmp_path / "training.jsonl"
    saved = cli("export", batch, "-o", str(target))
    assert saved.returncode == 0 and target.read_bytes() == training
    for args in (("status", "no-such-batch"), ("export", "no-such-batch")):
        failed = cli(*args)
        assert failed.returncode == 1 and "no batch with id 'no-such-batch'" in failed.stderr
    not_yet = cli("export", untouched)
    assert not_yet.returncode == 1 and "no training file yet" in not_yet.stderr
