"""The test harness itself (tests/support): waits that fail fast, a process finder that sees vLLM's processes,
and the rule that tests share helpers through it rather than importing each other."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from tests.support.environment import clean_environ
from tests.support.files import REPO
from tests.support.processes import MARKER, marked_processes, process_name
from tests.support.waiting import WaitTimeout, wait_for

# A marked process that starts a child titled like vLLM's engine core: setting the title overwrites the
# environment (the marker included) as /proc shows it, as it does for vLLM's processes.
ENGINE_LIKE = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c",
    "import setproctitle, sys; setproctitle.setproctitle('VLLM::EngineCore'); print(flush=True); sys.stdin.read()"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
child.stdout.readline()
print(child.pid, flush=True)
sys.stdin.read()
child.stdin.close()
child.wait()
"""


def test_a_watched_process_that_exits_ends_the_wait_at_once_with_its_log(tmp_path):
    log = tmp_path / "service.log"
    log.write_text("Traceback: the service broke\n")
    service = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    service.wait()
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"exited with 3 while waiting for the webserver") as failure:
        wait_for(lambda: False, 300, "the webserver", watch=[service], log=log)
    assert "the service broke" in str(failure.value)
    assert time.monotonic() - started < 60  # not the 300 s timeout


def test_an_assertion_in_the_predicate_is_raised_at_once_and_other_errors_are_retried():
    calls = []

    def dead() -> bool:
        calls.append(1)
        raise AssertionError("the server exited")

    with pytest.raises(AssertionError, match=r"the server exited \(while waiting for the server\)"):
        wait_for(dead, 300, "the server", interval=0.01)
    assert len(calls) == 1

    attempts = iter([ConnectionRefusedError("not yet"), ConnectionRefusedError("not yet"), "up"])

    def starting() -> str:
        value = next(attempts)
        if isinstance(value, Exception):
            raise value
        return value

    assert wait_for(starting, 300, "the server", interval=0.01) == "up"


def test_a_timeout_names_what_was_awaited_the_last_error_and_the_explanation():
    def refused() -> bool:
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(WaitTimeout) as failure:
        wait_for(refused, 0.2, "the API server", interval=0.05, explain=lambda: "runs: none")
    message = str(failure.value)
    assert message.startswith("timed out after 0s waiting for the API server")
    assert "connection refused" in message and message.endswith("\nruns: none")


def test_marked_processes_include_vllm_processes_below_a_marked_one():
    marker = uuid.uuid4().hex
    parent = subprocess.Popen([sys.executable, "-c", ENGINE_LIKE], env={**clean_environ(), MARKER: marker},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        engine_pid = int(parent.stdout.readline())
        found = {p.pid: process_name(p) for p in marked_processes(marker)}
        assert psutil.Process(engine_pid).environ().get(MARKER) is None  # its marker is unreadable
        assert found == {parent.pid: found[parent.pid], engine_pid: "VLLM::EngineCore"}
    finally:
        parent.stdin.close()
        parent.wait(30)
    assert marked_processes(marker) == []


def test_tests_import_no_test_module_and_nothing_from_bench():
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.split(".")[0] == "bench" or name.split(".")[-1].startswith("test_"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert offenders == []
