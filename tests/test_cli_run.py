"""`vllm-batch run` as a user runs it: a separate process on the embedded default instance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from tests.support.environment import instance_env
from tests.support.files import REPO, read_jsonl, write_jsonl
from tests.support.request_lines import chat_lines
from tests.support.services import VLLM_BATCH
from tests.support.waiting import wait_for


def test_killed_run_resumes_without_redoing_finished_chunks(tmp_path, tiny_model):
    env = instance_env(tmp_path, VBATCH_CHUNK_SIZE="20", VBATCH_MAX_NUM_SEQS="128")
    batch = write_jsonl(tmp_path / "big.jsonl", chat_lines(200))
    args = ["run", str(batch), "--model", str(tiny_model), "--model-name", "tiny", "--batch-id", "big", "--json"]
    chunks = tmp_path / "data" / "batches" / "big" / "chunks"

    # The run waits after each chunk while the hold file exists (a test-only hook): killed half-way on any hardware.
    hold = tmp_path / "hold"
    hold.touch()
    proc = subprocess.Popen(VLLM_BATCH + args, env={**env, "VBATCH_TEST_HOLD_FILE": str(hold)}, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: list(chunks.glob("chunk-*.parquet")), 400, "a finished chunk", interval=0.1, watch=[proc])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its engine processes, with no chance to clean up
        proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in chunks.glob("chunk-*.parquet")}
    assert 1 <= len(finished) < 10

    result = run_cli(args, env)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["chunks_resumed"] == len(finished)
    assert summary["chunks_resumed"] + summary["chunks_run"] == 10
    assert {p.name: p.stat().st_mtime_ns for p in chunks.glob("chunk-*.parquet") if p.name in finished} == finished
    outputs = read_jsonl(Path(summary["output_file"]))
    assert [o["custom_id"] for o in outputs] == [f"q{i}" for i in range(200)]  # each exactly once, in order
    assert all(o["response"]["body"]["usage"]["completion_tokens"] == 16 for o in outputs)
    # Not a terminal: plain progress lines instead of a bar, ending on the whole batch.
    progress = [line for line in result.stderr.splitlines() if line.startswith("progress: ")]
    assert progress and progress[-1].startswith("progress: 200/200 requests"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("host", [False, True], ids=["in-process", "engine-host"])
def test_a_killed_engine_core_is_replaced_and_the_batch_completes(tmp_path, tiny_model, host):
    import psutil

    # The run waits after each chunk while the hold file exists (a test-only hook), and has more requests than
    # the engine's window (512): however fast the engine is, some are still to be admitted when it dies.
    hold = tmp_path / "hold"
    hold.touch()
    env = instance_env(tmp_path, VBATCH_CHUNK_SIZE="20", VBATCH_MAX_NUM_SEQS="128", VBATCH_ENGINE_HOST=str(host).lower(),
                       VBATCH_TEST_HOLD_FILE=str(hold))
    batch = write_jsonl(tmp_path / "big.jsonl", chat_lines(600))
    chunks = tmp_path / "data" / "batches" / "dies" / "chunks"
    proc = subprocess.Popen(VLLM_BATCH + ["run", str(batch), "--model", str(tiny_model), "--model-name", "tiny",
                                   "--batch-id", "dies", "--json"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: list(chunks.glob("chunk-*.parquet")), 400, "a finished chunk", interval=0.1, watch=[proc])
        if host:
            record = json.loads((tmp_path / "data" / "engines" / "host.json").read_text())
            cores = [psutil.Process(pid) for pid in record["engine_pids"]]
        else:
            cores = [p for p in psutil.Process(proc.pid).children(recursive=True) if "EngineCore" in p.name()]
        assert cores, "no EngineCore process found"
        kept = {p.name: p.stat().st_mtime_ns for p in chunks.glob("chunk-*.parquet")}
        for core in cores:
            core.kill()
        hold.unlink()
        out, err = proc.communicate(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if host:  # the host outlives the run by design
            from resources.engine_host_client import stop_host

            stop_host(tmp_path / "data" / "engines")
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out[out.index("{"):])
    assert summary["completed"] == 600 and summary["failed"] == 0
    assert summary["engines_loaded_in_process"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in chunks.glob("chunk-*.parquet") if p.name in kept} == kept
    outputs = read_jsonl(Path(summary["output_file"]))
    assert [o["custom_id"] for o in outputs] == [f"q{i}" for i in range(600)]


@pytest.mark.parametrize("host", [False, True], ids=["in-process", "engine-host"])
def test_an_embeddings_batch_loads_exactly_one_engine(tmp_path, tiny_model, host):
    # The prefetch reads the file's first lines and loads the pooling engine batch_chunks asks for;
    # before, it loaded a generative engine that batch_chunks then swapped for a pooling one.
    # Through an engine host it failed outright until the host told its clients about matryoshka.
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "tiny", "input": f"sentence number {i}"}} for i in range(120)]
    batch = write_jsonl(tmp_path / "emb.jsonl", lines)
    try:
        result = run_cli(["run", str(batch), "--model", str(tiny_model), "--model-name", "tiny", "--json"],
                         instance_env(tmp_path, VBATCH_ENGINE_HOST=str(host).lower()))
    finally:
        if host:
            from resources.engine_host_client import stop_host

            stop_host(tmp_path / "data" / "engines")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["completed"] == 120
    assert summary["engines_loaded_in_process"] == 1
    vectors = [o["response"]["body"]["data"][0]["embedding"] for o in read_jsonl(Path(summary["output_file"]))]
    assert len(vectors) == 120 and all(len(v) == len(vectors[0]) > 0 for v in vectors)


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "input file not found"),
    ("empty", "input file is empty"),
    ("blank", "has no request lines"),
    ("no-model-dir", "could not load model"),
    ("broken-model", "could not load model"),
    ("bad-setting", "invalid setting VBATCH_CHUNK_SIZE"),
])
def test_bad_files_models_and_settings_stop_with_one_readable_line(tmp_path, tiny_model, setup, message):
    env = instance_env(tmp_path)
    model = str(tiny_model)
    batch = write_jsonl(tmp_path / "in.jsonl", chat_lines(3))
    if setup == "missing":
        batch = tmp_path / "absent.jsonl"
    elif setup == "empty":
        batch.write_text("")
    elif setup == "blank":
        batch.write_text("\n\n  \n")
    elif setup == "no-model-dir":
        model = str(tmp_path / "no-such-model")
    elif setup == "broken-model":
        broken = tmp_path / "broken-model"
        broken.mkdir()
        (broken / "config.json").write_text(json.dumps({"architectures": ["NopeForCausalLM"], "model_type": "nope"}))
        model = str(broken)
    elif setup == "bad-setting":
        env["VBATCH_CHUNK_SIZE"] = "lots"
    result = run_cli(["run", str(batch), "--model", model, "--model-name", "tiny"], env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
