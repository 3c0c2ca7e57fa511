"""The README's commands, run once as a user runs them.

Every command of the README's ```bash blocks is either run here or named in NOT_RUN_HERE with the reason:
`make demo` runs in a scratch copy of the checkout (its Makefile, examples and instance files, the
checkout's .venv and models), so the user's own data/ is never read or written, and its console is held
to the README's sample output; the README's `vllm-batch run` runs on the README's own request line, with
the tiny model in place of the README's model folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.support.cli import LIBRARY_LINE, console_of
from tests.support.files import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)

DEMO = "make demo"
RUN = "vllm-batch run requests.jsonl --model /models/Llama-3.1-8B-Instruct --model-name llama-8b -o results/"
NOT_RUN_HERE = {"make test": "it is this test suite"}


def blocks(language: str) -> list[str]:
    return [body for lang, body in _BLOCK.findall(README) if lang == language]


def commands() -> list[str]:
    """The commands of the README's bash blocks, without their comments."""
    found = []
    for body in blocks("bash"):
        for line in body.splitlines():
            command = line.split("  #", 1)[0].strip()
            if command and not command.startswith("#"):
                found.append(command)
    return found


def test_every_readme_command_is_run_here_or_says_why_not():
    assert sorted(commands()) == sorted([DEMO, RUN, *NOT_RUN_HERE])


def user_env() -> dict[str, str]:
    """The environment of a user's shell: none of the suite's settings, no enclosing make."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("VBATCH_", "DAGSTER_", "VLLM_", "PYTEST_", "MAKE")) and name not in ("MFLAGS",)}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def scratch_checkout(folder: Path) -> Path:
    """What `make demo` reads of a checkout, in `folder`, with the checkout's installed .venv and models."""
    folder.mkdir()
    for name in ("Makefile", "pyproject.toml", "dagster.yaml", "workspace.yaml"):
        shutil.copy2(REPO / name, folder / name)  # copy2: the install stamp stays newer than pyproject.toml
    shutil.copytree(REPO / "examples", folder / "examples")
    for name in (".venv", "models"):
        (folder / name).symlink_to(REPO / name)
    return folder


def kind(line: str) -> str:
    """A console line's kind: its first word ('progress:', 'batch', 'output:', ...)."""
    return line.split(" ", 1)[0]


def collapsed(kinds: list[str]) -> list[str]:
    """Runs of progress lines as one: how many show depends on the machine's speed."""
    return [k for i, k in enumerate(kinds) if not (k == "progress:" and i and kinds[i - 1] == "progress:")]


def tokens_per_second(text: str) -> float:
    return float(re.findall(r"([\d,.]+) (?:generated )?tok(?:ens)?/s", text)[-1].replace(",", ""))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[int, str, Path]:
    checkout = scratch_checkout(tmp_path_factory.mktemp("demo") / "checkout")
    # -o: never (re)install from the scratch copy; the checkout's .venv is installed and stays pointed at it.
    status, console = console_of(["make", "demo", "-o", ".venv/.installed-cpu", "-o", ".venv/.installed-gpu"],
                                 checkout, user_env())
    return status, console, checkout


def test_make_demo_prints_what_the_readme_shows(demo):
    status, console, checkout = demo
    assert status == 0, console[-3000:]
    lines = console.strip().splitlines()
    assert len(lines) <= 15, console  # issue 24: at most 15 lines after the install
    assert not LIBRARY_LINE.search(console), console
    shown = next(body for body in blocks("text") if "progress:" in body).strip().splitlines()
    assert lines[:2] == shown[:2], console  # the sample file written, make's echo of the command
    assert collapsed([kind(line) for line in lines]) == collapsed([kind(line) for line in shown]), console
    # The same counts as the README (the sample file is generated the same way each time)...
    summary = next(line for line in lines if line.startswith("batch "))
    readme_summary = next(line for line in shown if line.startswith("batch "))
    assert summary.split(" in ", 1)[0].split(": ", 1)[1] == readme_summary.split(" in ", 1)[0].split(": ", 1)[1]
    seconds, load = map(float, re.search(r" in ([\d.]+)s \(engine load ([\d.]+)s", summary).groups())
    assert seconds >= load, summary  # the run's time counts the engine load it waited for
    # ...and the last progress line's rate is the summary's (issue 24: within 10%).
    last_progress = [line for line in lines if line.startswith("progress:")][-1]
    assert tokens_per_second(last_progress) == pytest.approx(tokens_per_second(summary), rel=0.10), console
    output = Path(next(line for line in lines if line.startswith("output: ")).removeprefix("output: "))
    errors = Path(next(line for line in lines if line.startswith("errors: ")).removeprefix("errors: "))
    assert output.resolve().is_relative_to(checkout.resolve())  # the scratch copy's data/, not the checkout's
    assert len(output.read_text().splitlines()) == 300 and len(errors.read_text().splitlines()) == 3
    # What the console did not show is in the log it names: vLLM's lines from this process and its engine core.
    log = checkout / lines[-1].removeprefix("log: ").split(" ", 1)[0]
    text = log.read_text()
    assert re.search(r"\(MainProcess pid=\d+\) (INFO|WARNING)", text)
    assert re.search(r"\(EngineCore pid=\d+\) (INFO|WARNING)", text)


def test_the_readme_run_command_runs_the_readme_request_line(tmp_path, tiny_model):
    (line,) = [body for body in blocks("json") if '"custom_id"' in body]
    request = json.loads(line)
    (tmp_path / "requests.jsonl").write_text(json.dumps(request) + "\n")
    args = RUN.replace("/models/Llama-3.1-8B-Instruct", str(tiny_model)).split()
    env = dict(user_env(), VBATCH_DTYPE="float32", VBATCH_ENFORCE_EAGER="true", VBATCH_MAX_MODEL_LEN="1024",
               VLLM_CPU_KVCACHE_SPACE="1")
    status, console = console_of([str(REPO / ".venv" / "bin" / args[0]), *args[1:]], tmp_path, env)
    assert status == 0, console[-3000:]
    assert re.search(r"^batch requests-\w+: 1 completed, 0 failed in ", console, re.M), console
    (answer,) = [json.loads(text) for text in (tmp_path / "results" / "output.jsonl").read_text().splitlines()]
    assert answer["custom_id"] == request["custom_id"] and answer["error"] is None
    assert answer["response"]["status_code"] == 200
    body = answer["response"]["body"]
    assert body["model"] == request["body"]["model"]
    assert 0 < body["usage"]["completion_tokens"] <= request["body"]["max_tokens"]
    assert (tmp_path / "results" / "errors.jsonl").read_text() == ""
