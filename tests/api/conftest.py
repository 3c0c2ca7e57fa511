"""A live stack for the API tests: a real `dagster-daemon`, the `vllm-batch serve` server, the tiny model.

Started once per session in a temporary DAGSTER_HOME and data folder; every process is stopped (its
whole process group, then anything left carrying this session's marker) at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.files import REPO

API_KEY = "test-key-7f3a9c2e5b1d"  # a constant: this module is imported twice (by pytest and by the tests)
OTHER_KEY = "test-other-key-4b8e1d0a9c63"  # a second tenant
ADMIN_KEY = "test-admin-key-9d2c5e7f1a04"  # sees every tenant
MAX_UPLOAD_BYTES = 256 * 1024
MODEL_NAME = "tiny-llama"


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
        return subprocess.run([sys.executable, "-m", "batch_pipeline.entrypoints.cli", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def log(self, name: str) -> str:
        """The tail of a process's log (for failure messages)."""
        return self.full_log(name)[-4000:]

    def full_log(self, name: str) -> str:
        """Everything a process of the stack has written so far."""
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stack_env(root: Path, tiny_model: Path) -> dict[str, str]:
    """The environment of every process of a stack rooted at `root`."""
    models = root / "models.yaml"
    models.write_text(yaml.safe_dump({"models": {MODEL_NAME: {"path": str(tiny_model)}}}))
    marker = uuid.uuid4().hex
    return {
        **os.environ,
        "DAGSTER_HOME": str(root / "dagster"),
        "VBATCH_HOME": str(REPO),
        "VBATCH_DATA_DIR": str(root / "data"),
        "VBATCH_MODELS_FILE": str(models),
        "VBATCH_API_KEYS": f"{OTHER_KEY},{API_KEY}",
        "VBATCH_ADMIN_API_KEYS": ADMIN_KEY,
        "VBATCH_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        "VBATCH_CHUNK_SIZE": "4",
        "VBATCH_DTYPE": "float32",
        "VBATCH_ENFORCE_EAGER": "true",
        "VBATCH_MAX_MODEL_LEN": "1024",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
        "VBATCH_TEST_STACK": marker,  # finds stray processes of this stack at teardown
        # While this file exists, a batch's step waits after each chunk (tests that cancel half-way).
        "VBATCH_TEST_HOLD_FILE": str(root / "hold"),
    }


def install_instance(env: dict[str, str]) -> None:
    """Write dagster.yaml into the stack's DAGSTER_HOME, as `vllm-batch` would."""
    from batch_pipeline.domain.instance import instance_config
    from batch_pipeline.domain.settings import Settings

    home = Path(env["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance_config(Settings(home=REPO)), sort_keys=False))
    # Create the SQLite databases once here: two processes creating them at the same moment leave
    # alembic with two heads, and the daemon's code server then never loads.
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        instance.get_run_records(limit=1)
        instance.all_instigator_state()
        instance.get_dynamic_partitions("batches")


def start(stack: Stack, name: str, args: list[str]) -> subprocess.Popen:
    log = (stack.root / f"{name}.log").open("w")
    process = subprocess.Popen(args, cwd=REPO, env=stack.env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    stack.processes.append(process)
    return process


def stop(stack: Stack) -> None:
    """Stop every process of the stack: each process group, then anything still carrying its marker."""
    for process in reversed(stack.processes):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.time() + 20
    for process in stack.processes:
        try:
            process.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    # Anything that left the process groups (vLLM's engine core, a run worker) still carries the marker.
    marker = f"VBATCH_TEST_STACK={stack.env['VBATCH_TEST_STACK']}".encode()
    for pid in stray_pids(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 15
    while stray_pids(marker) and time.time() < deadline:
        time.sleep(0.2)


def stray_pids(marker: bytes) -> list[int]:
    """Processes whose environment carries `marker` (only this stack's processes do)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_for_server(stack: Stack, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the API server exited: {stack.log('server')}")
        try:
            if httpx.get(f"{stack.base_url.removesuffix('/v1')}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the API server did not answer in {timeout}s: {stack.log('server')}")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    """A daemon and an API server on loopback, sharing one instance and data folder."""
    root = tmp_path_factory.mktemp("stack")
    live = Stack(root, stack_env(root, tiny_model))
    install_instance(live.env)
    port = free_port()
    live.base_url = f"http://127.0.0.1:{port}/v1"
    try:
        start(live, "daemon", [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w",
                               str(REPO / "workspace.yaml")])
        server = start(live, "server", [sys.executable, "-m", "batch_pipeline.entrypoints.cli", "serve", "--host", "127.0.0.1",
                                        "--port", str(port)])
        wait_for_server(live, server)
        yield live
    finally:
        stop(live)
        left = stray_pids(f"VBATCH_TEST_STACK={live.env['VBATCH_TEST_STACK']}".encode())
        assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="module")
def serve_only(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Callable[..., Stack]]:
    """A factory of API servers with no daemon (batches queue, nothing runs, no engine loads), each with
    the stack's settings plus the given environment; all are stopped at the end of the module."""
    started: list[Stack] = []

    def serve(**extra_env: str) -> Stack:
        root = tmp_path_factory.mktemp("served")
        live = Stack(root, {**stack_env(root, tiny_model), **extra_env})
        install_instance(live.env)
        port = free_port()
        live.base_url = f"http://127.0.0.1:{port}/v1"
        started.append(live)
        server = start(live, "server", [sys.executable, "-m", "batch_pipeline.entrypoints.cli", "serve", "--host", "127.0.0.1",
                                        "--port", str(port)])
        wait_for_server(live, server)
        return live

    try:
        yield serve
    finally:
        for live in started:
            stop(live)
        left = [pid for live in started for pid in stray_pids(f"VBATCH_TEST_STACK={live.env['VBATCH_TEST_STACK']}".encode())]
        assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="session")
def client(stack: Stack):
    """The official OpenAI client, pointed at the stack (only base_url and api_key differ)."""
    from openai import OpenAI

    with OpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=60) as openai_client:
        yield openai_client


@pytest.fixture
def offline(tmp_path: Path, tiny_model: Path) -> Stack:
    """A stack's environment with no processes: batches queue but no daemon launches them."""
    offline_stack = Stack(tmp_path, stack_env(tmp_path, tiny_model))
    install_instance(offline_stack.env)
    return offline_stack
