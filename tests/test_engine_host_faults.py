"""The warm engine host dying (SIGKILL: an OOM kill, a crash) while several runs are attached to it.

Each attached client must come out of its stream with EngineDied, naming the requests it had in flight (what
`run_chunks` readmits on a new engine), instead of waiting for answers that will never come.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
from pathlib import Path

import psutil

from batch_pipeline.domain.openai_bodies import prepare_requests
from resources.engine_host_client import attach, read_host, stop_host
from resources.engine_types import EngineDied
from resources.vllm_engine import VLLMEngine


def test_every_client_attached_to_a_host_that_dies_gets_engine_died_instead_of_hanging(tmp_path: Path, tiny_model):
    kwargs = VLLMEngine(dtype="float32", max_model_len=1024, enforce_eager=True).engine_kwargs(str(tiny_model))
    state = tmp_path / "engines"
    clients = [attach(state, kwargs, idle_seconds=120) for _ in range(2)]
    record = read_host(state)
    assert record is not None and {client.host_pid for client in clients} == {record["pid"]}  # one shared host
    outcomes: dict[int, BaseException | str] = {}
    streaming = [threading.Event() for _ in clients]

    def run(number: int) -> None:
        client = clients[number]
        body = json.dumps({"messages": [{"role": "user", "content": f"Client {number} says"}], "max_tokens": 400,
                           "temperature": 0, "ignore_eos": True})
        keys = itertools.count()
        requests = (request for _ in range(64) for request in prepare_requests(
            keys, "/v1/chat/completions", body, client.tokenizer, client.max_model_len, remote=True))
        try:
            for _ in client.stream(requests, in_flight=8):
                streaming[number].set()
            outcomes[number] = "the stream ended although the host was killed"
        except BaseException as exc:  # noqa: BLE001 - what the client saw is the result
            outcomes[number] = exc
        finally:
            streaming[number].set()

    threads = [threading.Thread(target=run, args=(number,), daemon=True) for number in range(len(clients))]
    try:
        for thread in threads:
            thread.start()
        for started in streaming:
            assert started.wait(600), "a client never got an output from the host"
        os.kill(record["pid"], signal.SIGKILL)
        for thread in threads:
            thread.join(120)  # a bound for a hang, not a timing: EngineDied comes as soon as the socket closes
        assert not any(thread.is_alive() for thread in threads), "a client still waits on the dead host"
    finally:
        for pid in record.get("engine_pids", []):  # the engine core, orphaned by the kill
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        stop_host(state)
        for client in clients:
            client.shutdown()
    for number, outcome in outcomes.items():
        assert isinstance(outcome, EngineDied), (number, repr(outcome))
        assert outcome.in_flight and "engine host went away" in str(outcome), str(outcome)
    assert sorted(outcomes) == [0, 1]
