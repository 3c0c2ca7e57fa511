"""The quiet console: `vllm-batch` shows its own lines; vLLM's, torch's and Dagster's output goes to a log file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.cli import LIBRARY_LINE, run_cli
from tests.support.files import REPO, write_jsonl
from tests.support.request_lines import chat_lines


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
def verbose_run(tmp_path_factory, tiny_model) -> tuple[subprocess.CompletedProcess, Path]:
    """One small batch run with -v on the tiny model (the quiet default is `make demo`'s: tests/test_readme.py)."""
    home = tmp_path_factory.mktemp("verbose")
    batch = write_jsonl(home / "in.jsonl", chat_lines(12, max_tokens=8))
    args = ["run", str(batch), "--model", str(tiny_model), "--model-name", "tiny", "--batch-id", "verbose", "-v"]
    return run_cli(args, cli_env(home), cwd=home), home


def test_verbose_shows_what_vllm_and_torch_print(verbose_run):
    result, home = verbose_run
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
    home = tmp_path / "home"
    result = run_cli(["run", str(batch), "--model", str(broken), "--model-name", "tiny"], cli_env(home), cwd=home)
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines[-1].startswith("error: batch ") and "could not load model" in lines[-1]
    assert "nope" in lines[-1] and "validation error for" not in lines[-1]  # the reason, not pydantic's header
    assert lines[-1].endswith("(log: data/logs/vllm-batch-run.log)")
    assert "Traceback" not in result.stderr
    assert not LIBRARY_LINE.search(result.stdout + result.stderr), result.stderr
