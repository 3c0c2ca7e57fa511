"""Finding the processes a test started, vLLM's engine processes included.

A test marks what it starts with a variable in the environment (`VBATCH_TEST_MARKER=<uuid>`); every
process started below inherits it. vLLM's own processes (VLLM::EngineCore, VLLM::Worker) set their
process title, which can overwrite the environment as /proc shows it: they count as marked when a
process that started them is.
"""

from __future__ import annotations

import contextlib
import os

import psutil

MARKER = "VBATCH_TEST_MARKER"


def marked_processes(marker: str, variable: str = MARKER) -> list[psutil.Process]:
    """Every live process (not this one, no zombie) whose environment has `variable=marker`, and every vLLM
    process below one of them."""
    found, vllm = [], []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if process.environ().get(variable) == marker:
                found.append(process)
            elif process_name(process).startswith("VLLM::"):
                vllm.append(process)
        except psutil.Error:
            if process_name(process).startswith("VLLM::"):
                vllm.append(process)
    pids = {p.pid for p in found}
    for process in vllm:
        with contextlib.suppress(psutil.Error):
            if any(parent.pid in pids for parent in process.parents()):
                found.append(process)
    return found


def kill_marked(marker: str, variable: str = MARKER) -> None:
    """SIGKILL every process `marked_processes` finds (an engine orphaned by a killed worker, say)."""
    for process in marked_processes(marker, variable):
        with contextlib.suppress(psutil.Error):
            process.kill()


def vllm_processes(processes: list[psutil.Process]) -> list[psutil.Process]:
    """vLLM's engine processes among `processes`."""
    return [p for p in processes if process_name(p).startswith("VLLM::")]


def process_name(process: psutil.Process) -> str:
    """The process's name (vLLM's processes: their title), or "" once it is gone."""
    try:
        return process.name()
    except psutil.Error:
        return ""


def command_line(process: psutil.Process) -> str:
    """The process's command line as one string, or "" once it is gone."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def children_running(parent: int | psutil.Process, word: str, recursive: bool = True) -> list[psutil.Process]:
    """The live descendants (children only: `recursive=False`) of `parent` with `word` in their command line."""
    try:
        process = parent if isinstance(parent, psutil.Process) else psutil.Process(parent)
        children = process.children(recursive=recursive)
    except psutil.Error:
        return []
    return [child for child in children if word in command_line(child)]


def daemons_of(supervisor: int | psutil.Process) -> list[psutil.Process]:
    """The `dagster-daemon` processes that `vllm-batch start` (pid `supervisor`) runs."""
    return children_running(supervisor, "dagster-daemon", recursive=False)
