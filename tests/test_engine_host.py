"""The warm engine host (VBATCH_ENGINE_HOST): batches attach to one engine that outlives their runs."""

from __future__ import annotations

import json
import time

import psutil

from tests.conftest import write_jsonl
from tests.test_cli_run import chat_lines, cli_env, run_cli


def test_the_second_batch_attaches_to_the_warm_engine_and_an_idle_host_frees_it(tmp_path, tiny_model):
    env = cli_env(tmp_path, VBATCH_ENGINE_HOST="true", VBATCH_ENGINE_IDLE_SECONDS="20")
    host_record = tmp_path / "data" / "engines" / "host.json"
    summaries = []
    for name in ("first", "second"):
        batch = write_jsonl(tmp_path / f"{name}.jsonl", chat_lines(40))
        result = run_cli(["run", str(batch), "--model", str(tiny_model), "--model-name", "tiny", "--json"], env)
        assert result.returncode == 0, result.stderr[-2000:]
        summaries.append(json.loads(result.stdout[result.stdout.index("{"):]))
        assert summaries[-1]["completed"] == 40
        assert host_record.exists(), "the host must outlive the run"
        if name == "first":
            host = json.loads(host_record.read_text())
    assert json.loads(host_record.read_text())["pid"] == host["pid"]  # the same engine served both
    log = (tmp_path / "data" / "engines" / "host.log").read_text()
    assert log.count("engine host for") == 1, log  # one engine load for the two batches
    processes = [psutil.Process(pid) for pid in [host["pid"], *host["engine_pids"]] if psutil.pid_exists(pid)]
    assert processes and processes[0].is_running()
    _, alive = psutil.wait_procs(processes, timeout=60)  # idle for 20 s: the host shuts its engine down
    assert not alive, [p.pid for p in alive]
    deadline = time.monotonic() + 5
    while host_record.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not host_record.exists()
