"""The quiet console: `vllm-batch` shows its own lines; vLLM's, torch's and Dagster's output goes to a log file."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.files import REPO, write_jsonl
from tests.support.request_lines import chat_lines

CLI = [sys.executable, "-m", "batch_pipeline.entrypoints.cli"]
# What vLLM, torch, Triton and Python's warnings print: vLLM's "WARNING 12-07 19:58:03 [file.py:1]" prefix, a
# FutureWarning or UserWarning line, torch's C++ "[W1207 ..." lines, the Triton, LD_PRELOAD and checkpoint lines.
LIBRARY_LINE = re.compile(r"(WARNING|INFO) \d\d-\d\d |Warning: |^\[W\d{4}|Triton|LD_PRELOAD|safetensors", re.M)


def run_cli(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in its own process group (killed with what it left behind)."""
    proc = subprocess.Popen(CLI + args, env=env, cwd=env["VBATCH_HOME"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def cli_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), VBATCH_HOME=str(home), DAGSTER_HOME=str(home / "dagster"),
               VBATCH_DTYPE="float32", VBATCH_ENFORCE_EAGER="true", VBATCH_MAX_MODEL_LEN="1024",
               VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    env.pop("VLLM_LOGGING_LEVEL", None)  # vLLM's default (INFO), as a user has it
    for name in ("dagster.yaml", "workspace.yaml"):
        (home / name).write_text((REPO / name).read_text())
    return env


def test_library_output_of_this_process_and_its_children_goes_to_the_log(tmp_path):
    # Python warnings, a library's logger, C-level writes to fd 1 and 2, and a child process that inherits
    # them all land in the log; click.echo (stdout and stderr) and the project's own warnings stay on the console.
    log = tmp_path / "logs" / "vllm-batch-x.log"
    script = textwrap.dedent(f"""
        import logging, os, subprocess, sys, warnings
        from pathlib import Path
        import click
        from batch_pipeline.entrypoints.quiet_console import QuietConsole
        quiet = QuietConsole(Path({str(log)!r}), "x")
        click.echo("own stdout line")
        click.echo("own stderr line", err=True)
        warnings.warn("a library FutureWarning", FutureWarning)
        logging.getLogger("some.library").warning("a library logger line")
        logging.getLogger("resources.vllm_engine").warning("the engine died; starting a new one")
        os.write(1, b"a C-level stdout line\\n")
        os.write(2, b"a C-level stderr line\\n")
        subprocess.run([sys.executable, "-c", "import sys; print('child stdout'); print('child stderr', file=sys.stderr)"])
        assert quiet.wrote()
        quiet.close()
        click.echo("after close", err=True)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "own stdout line\n"
    assert result.stderr == "own stderr line\nwarning: the engine died; starting a new one\nafter close\n"
    text = log.read_text()
    for line in ("a library FutureWarning", "a library logger line", "a C-level stdout line", "a C-level stderr line",
                 "child stdout", "child stderr"):
        assert line in text
    assert "own " not in text


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """One small batch run twice on the tiny model: quiet (the default) and with -v."""
    results = {}
    for name, extra in (("quiet", []), ("verbose", ["-v"])):
        home = tmp_path_factory.mktemp(name)
        batch = write_jsonl(home / "in.jsonl", chat_lines(12, max_tokens=8))
        args = ["run", str(batch), "--model", str(tiny_model), "--model-name", "tiny", "--batch-id", name, *extra]
        results[name] = (run_cli(args, cli_env(home)), home)
    return results


def test_a_run_shows_only_its_own_lines_and_says_where_the_rest_went(runs):
    result, home = runs["quiet"]
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert not LIBRARY_LINE.search(console), console
    assert result.stdout.startswith("batch quiet: 12 completed, 0 failed")
    log = home / "data" / "logs" / "vllm-batch-run.log"
    assert result.stderr.strip().splitlines()[-1].startswith("log: data/logs/vllm-batch-run.log")
    assert len(console.strip().splitlines()) <= 8, console
    # What the console did not show is in the log: vLLM's lines from this process and its engine core.
    text = log.read_text()
    assert re.search(r"\(MainProcess pid=\d+\) (INFO|WARNING)", text)
    assert re.search(r"\(EngineCore pid=\d+\) (INFO|WARNING)", text)


def test_verbose_shows_what_vllm_and_torch_print(runs):
    result, home = runs["verbose"]
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert LIBRARY_LINE.search(console)
    assert re.search(r"\(EngineCore pid=\d+\) (INFO|WARNING)", console)
    assert "batch verbose: 12 completed, 0 failed" in result.stdout
    assert "log: " not in result.stderr
    assert not (home / "data" / "logs" / "vllm-batch-run.log").exists()


def test_a_failed_engine_load_says_why_in_one_line_with_the_log(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["NopeForCausalLM"], "model_type": "nope"}')
    batch = write_jsonl(tmp_path / "in.jsonl", chat_lines(3, max_tokens=8))
    result = run_cli(["run", str(batch), "--model", str(broken), "--model-name", "tiny"], cli_env(tmp_path / "home"))
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines[-1].startswith("error: batch ") and "could not load model" in lines[-1]
    assert "nope" in lines[-1] and "validation error for" not in lines[-1]  # the reason, not pydantic's header
    assert lines[-1].endswith("(log: data/logs/vllm-batch-run.log)")
    assert "Traceback" not in result.stderr
    assert not LIBRARY_LINE.search(result.stdout + result.stderr), result.stderr
