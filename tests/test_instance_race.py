"""A fresh instance opened by many processes at once is created once, on SQLite and on PostgreSQL.

Without the creation lock, two processes that open a fresh home together both create the storage and
stamp alembic: the instance is left with two heads and no process can ever open it again.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.api_stack import API_KEY, TERMINAL, Stack, chat_text, stack_env
from tests.support.files import REPO
from tests.support.ports import free_port
from tests.support.postgres import fresh_database
from tests.support.request_lines import MODEL_NAME
from tests.support.services import VLLM_BATCH
from tests.support.waiting import wait_for

# Each process waits for this file after its imports, so they all open the instance in the same instant.
OPEN_AT_ONCE = """
import os, sys, time
from pathlib import Path
from batch_pipeline.domain.instance import open_instance
from batch_pipeline.domain.settings import get_settings
settings = get_settings()
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
instance = open_instance(settings)
instance.get_run_records(limit=1)
instance.get_dynamic_partitions("batches")
instance.all_instigator_state()
print("opened")
"""


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request) -> Iterator[str | None]:
    """None for SQLite, else the URL of a database of its own (fresh: the race is at creation)."""
    if request.param == "sqlite":
        yield None
        return
    with fresh_database("vllm_batch_race") as url:
        yield url


def fresh_env(root: Path, tiny_model: Path, postgres_url: str | None) -> dict[str, str]:
    env = stack_env(root, tiny_model)
    if postgres_url:
        env["VBATCH_POSTGRES_URL"] = postgres_url
    return env


def test_processes_opening_a_fresh_instance_at_once_create_it_once(tmp_path: Path, tiny_model: Path,
                                                                   backend: str | None):
    env = fresh_env(tmp_path, tiny_model, backend)
    go = tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, str(go)], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(6)]
    go.touch()
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert all(process.returncode == 0 for process in processes), "\n----\n".join(outputs)

    # And the instance stays usable: a later process opens it, with one alembic head per storage.
    later = subprocess.run([sys.executable, "-c", OPEN_AT_ONCE, str(go)], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert later.returncode == 0 and later.stdout.strip().endswith("opened"), later.stdout + later.stderr


def test_start_serve_run_and_submit_launched_together_on_a_fresh_home_then_a_batch_runs(
        tmp_path: Path, tiny_model: Path):
    # On the embedded default, where the race was seen. PostgreSQL's creation race is the test above;
    # the whole stack on PostgreSQL starts in tests/test_operations.py (three engine loads here: 4 min).
    from openai import OpenAI

    live = Stack(tmp_path, fresh_env(tmp_path, tiny_model, None))
    batch_file = tmp_path / "three.jsonl"
    batch_file.write_text("".join(chat_text(f"req-{i}", f"req-{i}", max_tokens=4) + "\n" for i in range(3)))
    port = free_port()
    live.base_url = f"http://127.0.0.1:{port}/v1"
    cli = VLLM_BATCH
    try:
        # All four at once on a home that does not exist yet, as two terminals or systemd units would.
        supervisor = live.start("start", [*cli, "start", "--host", "127.0.0.1", "--port", str(free_port())])
        server = live.start("server", [*cli, "serve", "--host", "127.0.0.1", "--port", str(port)])
        run = live.start("run", [*cli, "run", str(batch_file), "--model", MODEL_NAME, "--batch-id", "by-run"])
        submit = live.start("submit", [*cli, "submit", str(batch_file), "--model", MODEL_NAME,
                                       "--batch-id", "by-submit"])
        assert submit.wait(300) == 0, live.log("submit")
        live.wait_for_server(server, timeout=300)
        assert run.wait(600) == 0, live.log("run")

        with OpenAI(base_url=live.base_url, api_key=API_KEY, max_retries=0, timeout=60) as client:
            uploaded = client.files.create(file=batch_file.open("rb"), purpose="batch")
            batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            batch = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status in TERMINAL and b, 600,
                             "the API batch to end", interval=1, watch=[supervisor], log=live.root / "start.log")
            assert batch.status == "completed" and batch.request_counts.completed == 3, batch
        submitted = live.cli("status", "by-submit")
        assert submitted.returncode == 0 and submitted.stdout.startswith("by-submit  "), submitted.stderr
        # The webserver never crash-looped on a broken instance.
        assert "exited with" not in live.log("start"), live.log("start")
    finally:
        live.stop()
