"""A live Batch API stack: `vllm-batch serve`, optionally a `dagster-daemon`, on one instance and data folder.

The fixtures that start one are in tests/api/conftest.py; the tests that start their own (a race on a fresh
home, a queued batch without a daemon) use these parts directly.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import yaml
from openai.types import Batch

from tests.support.environment import CPU_ENGINE, clean_environ, models_file
from tests.support.files import REPO
from tests.support.processes import kill_marked, marked_processes
from tests.support.request_lines import MODEL_NAME, chat_line
from tests.support.services import VLLM_BATCH, start_process, stop_processes
from tests.support.waiting import WaitTimeout, wait_for

API_KEY = "test-key-7f3a9c2e5b1d"
OTHER_KEY = "test-other-key-4b8e1d0a9c63"  # a second tenant
ADMIN_KEY = "test-admin-key-9d2c5e7f1a04"  # sees every tenant
MAX_UPLOAD_BYTES = 256 * 1024
STACK_MARKER = "VBATCH_TEST_STACK"  # finds stray processes of a stack at teardown


@dataclass
class Stack:
    """The processes and folders of one live stack."""

    root: Path
    env: dict[str, str]
    base_url: str = ""
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return Path(self.env["VBATCH_DATA_DIR"])

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run `vllm-batch ARGS` against this stack."""
        return subprocess.run([*VLLM_BATCH, *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def log(self, name: str) -> str:
        """The tail of a process's log (for failure messages)."""
        return self.full_log(name)[-4000:]

    def full_log(self, name: str) -> str:
        """Everything a process of the stack has written so far."""
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        """Start a process of the stack, its output in ROOT/NAME.log."""
        process = start_process(args, self.env, self.root / f"{name}.log")
        self.processes.append(process)
        return process

    def wait_for_server(self, process: subprocess.Popen, timeout: float = 90) -> None:
        """Wait until the API server `process` answers /health."""
        def healthy() -> bool:
            return httpx.get(f"{self.base_url.removesuffix('/v1')}/health", timeout=2).status_code == 200

        wait_for(healthy, timeout, "the API server to answer /health", watch=[process],
                 log=self.root / "server.log")

    def stop(self) -> None:
        """Stop every process of the stack: each process group, then anything still carrying its marker."""
        stop_processes(*reversed(self.processes), timeout=20)
        # Anything that left the process groups (vLLM's engine core, a run worker) still carries the marker.
        kill_marked(self.env[STACK_MARKER], STACK_MARKER)
        with contextlib.suppress(WaitTimeout):  # the caller asserts that none is left
            wait_for(lambda: not self.strays(), 15, "the stack's stray processes to exit", interval=0.2)

    def strays(self) -> list[int]:
        """Live processes of this stack."""
        return [process.pid for process in marked_processes(self.env[STACK_MARKER], STACK_MARKER)]


def stack_env(root: Path, tiny_model: Path) -> dict[str, str]:
    """The environment of every process of a stack rooted at `root`."""
    return {
        **clean_environ(),
        **CPU_ENGINE,
        "DAGSTER_HOME": str(root / "dagster"),
        "VBATCH_HOME": str(REPO),
        "VBATCH_DATA_DIR": str(root / "data"),
        "VBATCH_MODELS_FILE": str(models_file(root, {MODEL_NAME: tiny_model})),
        "VBATCH_API_KEYS": f"{OTHER_KEY},{API_KEY}",
        "VBATCH_ADMIN_API_KEYS": ADMIN_KEY,
        "VBATCH_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        "VBATCH_CHUNK_SIZE": "4",
        STACK_MARKER: uuid.uuid4().hex,
        # While this file exists, a batch's step waits after each chunk (tests that cancel half-way).
        "VBATCH_TEST_HOLD_FILE": str(root / "hold"),
    }


def install_instance(env: dict[str, str]) -> None:
    """Write dagster.yaml into the stack's DAGSTER_HOME, as `vllm-batch` would."""
    from dagster import DagsterInstance

    from batch_pipeline.domain.instance import instance_config
    from batch_pipeline.domain.settings import Settings

    home = Path(env["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance_config(Settings(home=REPO)), sort_keys=False))
    # Create the SQLite databases once here: two processes creating them at the same moment leave
    # alembic with two heads, and the daemon's code server then never loads.
    with DagsterInstance.from_config(str(home)) as instance:
        instance.get_run_records(limit=1)
        instance.all_instigator_state()
        instance.get_dynamic_partitions("batches")


TERMINAL = {"completed", "failed", "expired", "cancelled"}


def chat_text(custom_id: str, content: str, max_tokens: int = 6, model: str = MODEL_NAME) -> str:
    """A chat request line as the text of an uploaded file's line."""
    return json.dumps(chat_line(custom_id, content, model, max_tokens=max_tokens))


def poll(client: openai.OpenAI, batch_id: str, until: set[str], timeout: float) -> tuple[Batch, list[str]]:
    """Poll a batch until its status is in `until`; returns it and every status seen, in order."""
    seen: list[str] = []

    def arrived() -> Batch | None:
        batch = client.batches.retrieve(batch_id)
        if not seen or seen[-1] != batch.status:
            seen.append(batch.status)
        return batch if batch.status in until else None

    batch = wait_for(arrived, timeout, f"batch {batch_id} to reach {sorted(until)}", interval=1,
                     retry=(), explain=lambda: f"statuses seen: {seen}")
    return batch, seen
