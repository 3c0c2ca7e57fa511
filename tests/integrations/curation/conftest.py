"""A real Label Studio server for the curation tests: installed once in a cached venv, started once per session.

`make services-curation` installs it (the `test` target does it first); running pytest alone installs
it through the same target when it is missing. The server gets a fresh data folder each session.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support.files import REPO
from tests.support.ports import free_port
from tests.support.services import start_process, stop_processes
from tests.support.waiting import wait_for

CACHE = Path(os.environ.get("VBATCH_TEST_CACHE") or Path.home() / ".cache" / "vllm-batch-tests")
LABEL_STUDIO_BIN = CACHE / "label-studio-venv" / "bin" / "label-studio"
TEMPLATE = CACHE / "label-studio-data-template"
TOKEN = "curation-tests-token-0123456789abcdef"
STARTUP_SECONDS = 180


@dataclass(frozen=True)
class LabelStudioServer:
    url: str
    token: str
    process: subprocess.Popen | None

    def client(self):
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=self.token)


def _answers(url: str, token: str = TOKEN) -> bool:
    request = urllib.request.Request(f"{url}/api/projects?page_size=1", headers={"Authorization": f"Token {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def label_studio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """Label Studio on 127.0.0.1 with a preset user and a legacy API token.

    VBATCH_TEST_LABEL_STUDIO_URL and VBATCH_TEST_LABEL_STUDIO_TOKEN point the tests at a server already
    running instead (each test uses its own batch ids and projects).
    """
    if os.environ.get("VBATCH_TEST_LABEL_STUDIO_URL"):
        yield LabelStudioServer(os.environ["VBATCH_TEST_LABEL_STUDIO_URL"].rstrip("/"),
                                os.environ["VBATCH_TEST_LABEL_STUDIO_TOKEN"], None)
        return
    if not LABEL_STUDIO_BIN.exists():
        subprocess.run(["make", "-C", str(REPO), "services-curation"], check=True)
    # The first start (database migrations, the preset user and token) takes 30-90 s; it is done once into a
    # cached template, and each session starts on a fresh copy of it in a few seconds.
    if not (TEMPLATE / ".ready").exists():
        shutil.rmtree(TEMPLATE, ignore_errors=True)
        _stop(_start(TEMPLATE)[0])
        (TEMPLATE / ".ready").touch()
    data_dir = tmp_path_factory.mktemp("label-studio")
    shutil.copytree(TEMPLATE / "data", data_dir / "data")
    process, url = _start(data_dir)
    yield LabelStudioServer(url, TOKEN, process)
    _stop(process)


def _start(folder: Path) -> tuple[subprocess.Popen, str]:
    """Start Label Studio on a free port with its data in `folder/data`; wait until the API answers."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "LABEL_STUDIO_USERNAME": "reviewer@example.com", "LABEL_STUDIO_PASSWORD": "reviewer-pass-1",
           "LABEL_STUDIO_USER_TOKEN": TOKEN, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "LATEST_VERSION_CHECK": "false"}
    process = start_process([str(LABEL_STUDIO_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port",
                             str(port), "--data-dir", str(folder / "data")], env, folder / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url), STARTUP_SECONDS, "Label Studio to answer", watch=[process],
                 log=folder / "server.log")
    except AssertionError:
        _stop(process)
        raise
    return process, url


def _stop(process: subprocess.Popen) -> None:
    stop_processes(process, timeout=30)


@pytest.fixture
def curation_settings(tmp_path: Path, label_studio_server: LabelStudioServer):
    """Settings with curation on, pointed at the session's server, one project per batch (no engine needed)."""
    from pydantic import SecretStr

    from batch_pipeline.domain.settings import Settings

    return Settings(home=REPO, data_dir=tmp_path / "data", dagster_home=tmp_path / "dagster", enable_curation=True,
                    label_studio_url=label_studio_server.url, label_studio_api_key=SecretStr(label_studio_server.token),
                    curation_project_per="batch", curation_page_size=50, engine_host=False)


@pytest.fixture
def batch_id():
    """Batch ids unique to this session, so a reused server (or a re-run) never sees another run's tasks."""
    suffix = os.urandom(3).hex()
    return lambda name: f"{name}-{suffix}"


# A batch's files as batch_input and batch_results write them, without running an engine.
REQUEST_SCHEMA = pa.schema([("line", pa.int64()), ("custom_id", pa.string()), ("url", pa.string()), ("body", pa.string())])


def chat_item(custom_id: str, prompt: str, answer: str, **body) -> dict:
    return {"custom_id": custom_id, "url": "/v1/chat/completions", "answer": answer,
            "body": {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": prompt}], **body}}


def completion_item(custom_id: str, prompt: str, answer: str) -> dict:
    return {"custom_id": custom_id, "url": "/v1/completions", "answer": answer, "body": {"model": "m", "prompt": prompt}}


def responses_item(custom_id: str, input_, answer: str, **body) -> dict:
    return {"custom_id": custom_id, "url": "/v1/responses", "answer": answer, "body": {"model": "m", "input": input_, **body}}


def response_object(model_name: str, answer: str) -> dict:
    """A `response` body in OpenAI's shape, the answer split over two output_text parts (OpenAI may send several;
    batch_pipeline/domain/openai_bodies.py writes one), so that a reader that takes only the first is caught."""
    cut = len(answer) // 2
    return {"id": "resp_x", "object": "response", "created_at": 1, "status": "completed", "error": None,
            "incomplete_details": None, "model": model_name, "parallel_tool_calls": True, "tool_choice": "auto",
            "tools": [], "output": [{"id": "msg_x", "type": "message", "role": "assistant", "status": "completed",
                                     "content": [{"type": "output_text", "text": text, "annotations": []}
                                                 for text in (answer[:cut], answer[cut:])]}],
            "usage": {"input_tokens": 3, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens": 2,
                      "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 5}}


def failed_item(custom_id: str) -> dict:
    return {"custom_id": custom_id, "url": "/v1/chat/completions", "answer": None,
            "body": {"model": "m", "messages": [{"role": "user", "content": "too long"}]}}


def write_batch(settings, instance, batch_id: str, model_name: str, items: list[dict]) -> Path:
    """Write batch.json, requests.parquet, results.parquet, output.jsonl and summary.json; add the partition."""
    from batch_pipeline.domain.batches import BatchSummary, save_summary
    from batch_pipeline.domain.chunks import CHUNK_SCHEMA, output_line_id
    from batch_pipeline.domain.intake import register
    from batch_pipeline.domain.models import ServedModel
    from resources.storage import BatchStorage

    paths = BatchStorage(data_dir=str(settings.resolved_data_dir)).batch(batch_id)
    register(settings, instance, paths.root / "input.jsonl", ServedModel(model_name, "models/tiny-llama"),
             source="test", batch_id=batch_id, chunk_size=16)
    requests, results = [], []
    for line, item in enumerate(items, start=1):
        requests.append({"line": line, "custom_id": item["custom_id"], "url": item["url"],
                         "body": json.dumps(item["body"])})
        row = {"line": line, "custom_id": item["custom_id"], "id": output_line_id(batch_id, line),
               "response": None, "error": None, "prompt_tokens": 3, "completion_tokens": 2}
        if item["answer"] is None:
            row.update(prompt_tokens=0, completion_tokens=0,
                       error=json.dumps({"code": "prompt_too_long", "message": "too long", "line": line}))
        elif item["url"] == "/v1/responses":
            row["response"] = json.dumps({"status_code": 200, "request_id": "r",
                                          "body": response_object(model_name, item["answer"])})
        else:
            choice = ({"index": 0, "message": {"role": "assistant", "content": item["answer"]}, "finish_reason": "stop"}
                      if "chat" in item["url"] else {"index": 0, "text": item["answer"], "finish_reason": "stop"})
            body = {"id": "x", "object": "chat.completion", "model": model_name, "choices": [choice],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
            row["response"] = json.dumps({"status_code": 200, "request_id": "r", "body": body})
        results.append(row)
    paths.requests.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(requests, schema=REQUEST_SCHEMA), paths.requests)
    paths.results_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(results, schema=CHUNK_SCHEMA), paths.results_parquet)
    with paths.output.open("w") as output:
        for row in results:
            if row["error"] is None:
                output.write(json.dumps({"id": row["id"], "custom_id": row["custom_id"],
                                         "response": json.loads(row["response"]), "error": None}) + "\n")
    failed = sum(item["answer"] is None for item in items)
    save_summary(paths, BatchSummary(batch_id=batch_id, model=model_name, total=len(items),
                                     completed=len(items) - failed, failed=failed,
                                     prompt_tokens=sum(row["prompt_tokens"] for row in results),
                                     completion_tokens=sum(row["completion_tokens"] for row in results),
                                     output_file=str(paths.output), error_file=str(paths.errors)))
    return paths.root


def materialize_curation(settings, instance, batch_id: str, *asset_names: str, run_config: dict | None = None,
                         raise_on_error: bool = True):
    """Materialise curation assets of one batch on a real instance, with the code location's resources."""
    from dagster import materialize

    from batch_pipeline.orchestration.definitions import build_definitions

    defs = build_definitions(settings)
    assets = [defs.get_assets_def(name) for name in asset_names]
    resources = {key: defs.resources[key] for key in ("storage", "label_studio")}
    return materialize(assets, partition_key=batch_id, instance=instance, resources=resources,
                       run_config=run_config, raise_on_error=raise_on_error)


def review_tasks(server: LabelStudioServer, batch_id: str) -> list:
    """Every review task of a batch in Label Studio, through the API."""
    from integrations.curation.resources import LabelStudio, data_filter

    resource = LabelStudio(url=server.url, api_key=server.token)
    projects = [p.id for p in server.client().projects.list(page_size=100)]
    return [task for project in projects
            for task in resource.iter_tasks(project, data_filter(kind="review", batch_id=batch_id), with_annotations=True)]


def review(decision: str | None = None, rating: int | None = None, answer: str | None = None) -> list[dict]:
    """An annotation's result as a reviewer submits it in the review config."""
    result = []
    if decision:
        result.append({"from_name": "decision", "to_name": "prompt", "type": "choices", "value": {"choices": [decision]}})
    if rating:
        result.append({"from_name": "rating", "to_name": "prompt", "type": "rating", "value": {"rating": rating}})
    if answer is not None:
        result.append({"from_name": "answer", "to_name": "prompt", "type": "textarea", "value": {"text": [answer]}})
    return result
