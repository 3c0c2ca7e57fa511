"""The warm engine host (VBATCH_ENGINE_HOST): batches attach to one engine that outlives their runs."""

from __future__ import annotations

import json
import threading
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


def test_two_batches_share_the_host_engine_at_once(tmp_path, tiny_model):
    """A second client is served while the first still has requests in the engine (issue 13, target 2):
    both run on the one engine, each gets exactly its own outputs."""
    from vllm import RequestOutput, SamplingParams

    from resources.engine_host import attach, stop_host
    from resources.vllm_engine import EngineRequest, VLLMEngine

    kwargs = VLLMEngine(dtype="float32", max_model_len=1024, enforce_eager=True).engine_kwargs(str(tiny_model))
    state = tmp_path / "engines"

    def requests(tokenizer, first_key: int, count: int, max_tokens: int) -> list[EngineRequest]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return [EngineRequest(key, tokenizer.encode(f"Question number {key}?"), params, "/v1/completions", False, 0)
                for key in range(first_key, first_key + count)]

    a = attach(state, kwargs, idle_seconds=60)
    try:
        stream_a = a.stream(requests(a.tokenizer, 0, 6, 96))
        first_a = [next(stream_a)]  # A is attached, with requests still in the engine
        b_done: dict = {}

        def batch_b() -> None:
            b = attach(state, kwargs, idle_seconds=60, replace=False)
            try:
                b_done["outputs"] = list(b.stream(requests(b.tokenizer, 0, 4, 8)))  # the same request ids as A's
                b_done["host"] = b.host_pid
            finally:
                b.shutdown()

        thread = threading.Thread(target=batch_b, daemon=True)
        thread.start()
        thread.join(timeout=120)
        assert not thread.is_alive(), "a second batch must be served while the first is still attached"
        assert b_done["host"] == a.host_pid
        assert sorted(request.key for request, _ in b_done["outputs"]) == [0, 1, 2, 3]
        assert all(isinstance(out, RequestOutput) and len(out.outputs[0].token_ids) == 8 for _, out in b_done["outputs"])
        rest = list(stream_a)  # A's requests ran on meanwhile; A gets them, and only them
        outputs_a = first_a + rest
        assert sorted(request.key for request, _ in outputs_a) == list(range(6))
        assert all(len(out.outputs[0].token_ids) == 96 for _, out in outputs_a)
    finally:
        a.shutdown()
        stop_host(state)
