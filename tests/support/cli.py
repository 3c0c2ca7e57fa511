"""`vllm-batch` as a user runs it: a process of its own."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from tests.support.files import REPO
from tests.support.services import VLLM_BATCH

# What vLLM, torch, Triton and Python's warnings print: vLLM's "WARNING 12-07 19:58:03 [file.py:1]" prefix, a
# FutureWarning or UserWarning line, torch's C++ "[W1207 ..." lines, the Triton, LD_PRELOAD and checkpoint lines.
LIBRARY_LINE = re.compile(r"(WARNING|INFO) \d\d-\d\d |Warning: |^\[W\d{4}|Triton|LD_PRELOAD|safetensors", re.M)


def run_cli(args: list[str], env: dict, timeout: int = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `vllm-batch ARGS` in its own process group; on a timeout the whole group (engine included) is killed."""
    proc = subprocess.Popen(VLLM_BATCH + args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"vllm-batch {args[0]} timed out; stderr ends: {err[-2000:]}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the CLI left behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def console_of(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> tuple[int, str]:
    """Exit status and console (stdout and stderr as one terminal shows them) of any command, in its own process
    group (killed with whatever it left behind)."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, out
