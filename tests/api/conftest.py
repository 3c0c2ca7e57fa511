"""A live stack for the API tests: a real `dagster-daemon`, the `vllm-batch serve` server, the tiny model.

Started once per session in a temporary DAGSTER_HOME and data folder; every process is stopped (its
whole process group, then anything left carrying this session's marker) at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The stack's parts live in tests/support/api_stack.py; the tests of this folder import these names from here.
from tests.support.api_stack import (  # noqa: F401
    ADMIN_KEY,
    API_KEY,
    MAX_UPLOAD_BYTES,
    OTHER_KEY,
    Stack,
    install_instance,
    stack_env,
)
from tests.support.files import REPO
from tests.support.ports import free_port
from tests.support.request_lines import MODEL_NAME  # noqa: F401
from tests.support.services import VLLM_BATCH


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    """A daemon and an API server on loopback, sharing one instance and data folder."""
    root = tmp_path_factory.mktemp("stack")
    live = Stack(root, stack_env(root, tiny_model))
    install_instance(live.env)
    port = free_port()
    live.base_url = f"http://127.0.0.1:{port}/v1"
    try:
        live.start("daemon", [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w",
                              str(REPO / "workspace.yaml")])
        server = live.start("server", [*VLLM_BATCH, "serve", "--host", "127.0.0.1", "--port", str(port)])
        live.wait_for_server(server)
        yield live
    finally:
        live.stop()
        assert not live.strays(), f"processes left behind: {live.strays()}"


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
        server = live.start("server", [*VLLM_BATCH, "serve", "--host", "127.0.0.1", "--port", str(port)])
        live.wait_for_server(server)
        return live

    try:
        yield serve
    finally:
        for live in started:
            live.stop()
        left = [pid for live in started for pid in live.strays()]
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
