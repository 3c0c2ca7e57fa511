"""`vllm-batch` as a user runs it: a process of its own."""

from __future__ import annotations

import os
import signal
import subprocess

from tests.support.files import REPO
from tests.support.services import VLLM_BATCH


def run_cli(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `vllm-batch ARGS` in its own process group; on a timeout the whole group (engine included) is killed."""
    proc = subprocess.Popen(VLLM_BATCH + args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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
