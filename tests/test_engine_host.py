"""The warm engine host (VBATCH_ENGINE_HOST): batches attach to one engine that outlives their runs."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import psutil

from tests.support.cli import run_cli
from tests.support.environment import instance_env
from tests.support.files import read_jsonl, write_jsonl
from tests.support.request_lines import chat_lines


def test_the_second_batch_attaches_to_the_warm_engine_and_an_idle_host_frees_it(tmp_path, tiny_model):
    env = instance_env(tmp_path, VBATCH_ENGINE_HOST="true", VBATCH_ENGINE_IDLE_SECONDS="20")
    host_record = tmp_path / "data" / "engines" / "host.json"
    summaries = []
    for name in ("first", "second"):
        batch = write_jsonl(tmp_path / f"{name}.jsonl", chat_lines(40))
        # The second run attaches to the warm host: Python lists every module it imports on stderr.
        # (Those after the quiet console took over stderr go to the command's log file: read both.)
        run_env = {**env, "PYTHONPROFILEIMPORTTIME": "1"} if name == "second" else env
        cli_logs = tmp_path / "data" / "logs"
        shutil.rmtree(cli_logs, ignore_errors=True)
        result = run_cli(["run", str(batch), "--model", str(tiny_model), "--model-name", "tiny", "--json"], run_env)
        assert result.returncode == 0, result.stderr[-2000:]
        if name == "second":
            listing = result.stderr + "".join(log.read_text(errors="replace") for log in cli_logs.glob("*.log*"))
            imported = {line.rsplit("|", 1)[-1].strip() for line in listing.splitlines()
                        if line.startswith("import time:")}
            assert "json" in imported and "transformers" in imported  # the listing is there
            # A run attached to a host never pays for vLLM's import (25 s per run on an H100 host).
            assert "vllm" not in imported and "torch" not in imported, sorted(
                m for m in imported if m.split(".")[0] in ("vllm", "torch"))[:20]
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


def test_two_batches_share_the_host_engine_at_once_and_a_huge_one_does_not_starve_a_small_one(tmp_path, tiny_model):
    """A second client is served while the first still has requests in the engine (issue 13, target 2):
    both run on the one engine, each gets exactly its own outputs. Fairness (issue 19): a small batch that
    attaches while a huge one runs waits at most the huge one's window, not the huge batch, and while both
    are attached the huge one keeps only its half of the window in flight. At the end the service the host
    belongs to is killed (SIGKILL, so it cannot stop its host): the host ends at once, not when idle."""
    import subprocess
    import sys

    from resources.engine_host_client import attach, stop_host
    from resources.engine_types import EngineRequest
    from resources.engine_wire import PlainOutput, SamplingSpec
    from resources.vllm_engine import VLLMEngine

    kwargs = VLLMEngine(dtype="float32", max_model_len=1024, enforce_eager=True).engine_kwargs(str(tiny_model))
    # A data folder deep enough that a socket file in it would pass AF_UNIX's 108 bytes (pytest-xdist's
    # temporary folders did: every host failed to start).
    state = tmp_path / ("deep-data-folder-" * 5) / "engines"

    def requests(tokenizer, first_key: int, count: int, max_tokens: int) -> list[EngineRequest]:
        params = SamplingSpec({"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        return [EngineRequest(key, tokenizer.encode(f"Question number {key}?"), params, "/v1/completions", False, 0)
                for key in range(first_key, first_key + count)]

    huge = 3000
    service = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    a = attach(state, kwargs, idle_seconds=600, service_pid=service.pid)
    try:
        window = a._host.window()
        stream_a = a.stream(requests(a.tokenizer, 0, huge, 4))
        outputs_a = [next(stream_a) for _ in range(50)]  # A is attached, with most of its requests to come
        b_done: dict = {}

        def batch_b() -> None:
            b = attach(state, kwargs, idle_seconds=60, replace=False)
            try:
                b_done["outputs"] = list(b.stream(requests(b.tokenizer, 0, 16, 4)))  # the same request ids as A's
                b_done["host"] = b.host_pid
            finally:
                b_done["finished_with_a_at"] = len(outputs_a)
                b.shutdown()

        thread = threading.Thread(target=batch_b, daemon=True)
        attached_at = len(outputs_a)
        thread.start()
        windows_while_b = []
        for output in stream_a:  # A goes on meanwhile
            outputs_a.append(output)
            if thread.is_alive():
                windows_while_b.append(a._host.window())
        thread.join(timeout=120)
        assert not thread.is_alive(), "a second batch must be served while the first is still attached"
        assert b_done["host"] == a.host_pid
        assert sorted(request.key for request, _ in b_done["outputs"]) == list(range(16))
        assert all(isinstance(out, PlainOutput) and len(out.outputs[0].token_ids) == 4 for _, out in b_done["outputs"])
        # A gets its requests, and only them.
        assert sorted(request.key for request, _ in outputs_a) == list(range(huge))
        assert all(len(out.outputs[0].token_ids) == 4 for _, out in outputs_a)
        # B finished long before A, behind at most A's window of requests (and what ran beside B's own).
        a_during_b = b_done["finished_with_a_at"] - attached_at
        assert a_during_b <= window + window // 2 < huge - 1000, (a_during_b, window)
        assert windows_while_b and min(windows_while_b) <= window // 2, (window, windows_while_b[:20])

        a.shutdown()
        host = psutil.Process(a.host_pid)
        assert host.is_running()  # detached, idle for less than its 600 s: still warm
        service.kill()
        host.wait(timeout=30)  # gone with its service (within its 1 s watch), long before the idle limit
    finally:
        a.shutdown()
        service.kill()
        stop_host(state)


PARITY_LINES = [
    {"custom_id": "chat-logprobs", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "tiny", "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2,
              "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]}},
    {"custom_id": "completions-n", "method": "POST", "url": "/v1/completions",
     "body": {"model": "tiny", "max_tokens": 6, "temperature": 0.8, "seed": 5, "n": 2, "logprobs": 2,
              "prompt": ["Once upon a time", "The answer is"]}},
    {"custom_id": "json-schema", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "tiny", "max_tokens": 24, "temperature": 0,
              "messages": [{"role": "user", "content": "A colour as JSON."}],
              "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": {
                  "type": "object", "properties": {"c": {"type": "string"}}, "required": ["c"]}}}}},
    {"custom_id": "responses", "method": "POST", "url": "/v1/responses",
     "body": {"model": "tiny", "input": "Say hi.", "instructions": "Be brief.", "max_output_tokens": 6,
              "temperature": 0}},
    # vLLM refuses this at SamplingParams: in the worker in-process, in the host for an attached run.
    {"custom_id": "bad-sampling", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "tiny", "max_tokens": 4, "temperature": 0.5, "top_k": -5,
              "messages": [{"role": "user", "content": "x"}]}},
]


def _comparable(record: dict) -> dict:
    """A result line without what differs between two runs of the same request (ids, times)."""
    record = json.loads(json.dumps(record))
    record.pop("id", None)
    body = (record.get("response") or {}).get("body") or {}
    for key in ("id", "created", "created_at", "completed_at"):
        body.pop(key, None)
    for item in body.get("output", []):
        item.pop("id", None)
    (record.get("response") or {}).pop("request_id", None)
    return record


def test_a_run_attached_to_the_host_answers_exactly_as_one_with_its_own_engine(tmp_path, tiny_model):
    """The attached worker builds no vLLM objects (sampling parameters travel as a spec, outputs come
    back as plain data): every line, errors included, must read as it does from an in-process engine."""
    from resources.engine_host_client import stop_host

    batch = write_jsonl(tmp_path / "parity.jsonl", PARITY_LINES)
    results = {}
    for host in (False, True):
        env = instance_env(tmp_path / str(host), VBATCH_ENGINE_HOST=str(host).lower())
        try:
            result = run_cli(["run", str(batch), "--model", str(tiny_model), "--model-name", "tiny",
                              "--batch-id", "parity", "--json"], env)
        finally:
            if host:
                stop_host(tmp_path / str(host) / "data" / "engines")
        assert result.returncode == 0, result.stderr[-2000:]
        summary = json.loads(result.stdout[result.stdout.index("{"):])
        lines = read_jsonl(Path(summary["output_file"])) + read_jsonl(Path(summary["error_file"]))
        results[host] = {line["custom_id"]: _comparable(line) for line in lines}
    in_process, attached = results[False], results[True]
    assert sorted(in_process) == sorted(line["custom_id"] for line in PARITY_LINES)
    assert in_process["bad-sampling"]["error"]["code"] == "invalid_body", in_process["bad-sampling"]
    assert in_process["chat-logprobs"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert len(in_process["completions-n"]["response"]["body"]["choices"]) == 4
    for custom_id in in_process:
        assert attached[custom_id] == in_process[custom_id], custom_id
