"""The engine host process: it owns `vllm.LLM` and serves the run workers attached to it.

Started by resources/engine_host_client.py (`python -m resources.engine_host_server`, its config on
stdin) in a session of its own, so it outlives the run worker that started it; the conversation it
serves is in resources/engine_wire.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

import psutil

from resources.engine_processes import guard_engine
from resources.engine_types import admission_errors
from resources.engine_wire import FAILED, HOST_RECORD, plain_output
from resources.local_engine import load_failure_reason, resolve_platform_defaults, watch_core_death

MIN_SHARE = 16  # below this, a client's round trips would leave the engine short of requests


def _serve(config: dict) -> None:
    from vllm import LLM

    state_dir = Path(config["state_dir"])
    kwargs = config["kwargs"]
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    started = time.perf_counter()
    try:
        llm = LLM(**resolve_platform_defaults(kwargs))
    except Exception as exc:
        print(f"{FAILED}{load_failure_reason(exc)}", flush=True)
        sys.exit(1)
    guard_engine({p.pid for p in psutil.Process().children(recursive=True)} - before)  # dies with the host
    try:
        listener = Listener(config["address"], family="AF_UNIX", authkey=bytes.fromhex(config["authkey"]))
    except OSError as exc:
        print(f"{FAILED}cannot listen on {config['address']!r}: {exc}", flush=True)
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        os._exit(1)
    engine = llm.llm_engine
    watch_core_death(llm)  # a killed core must end a step with EngineDeadError, not hang it
    vllm_config = engine.vllm_config
    me = psutil.Process()
    record = {"pid": me.pid, "started": me.create_time(), "address": config["address"], "authkey": config["authkey"],
              "model": kwargs["model"], "kwargs": kwargs,
              "engine_pids": sorted({p.pid for p in me.children(recursive=True)} - before),
              "max_model_len": vllm_config.model_config.max_model_len,
              "max_num_seqs": vllm_config.scheduler_config.max_num_seqs,
              "runner": getattr(vllm_config.model_config, "runner_type", "generate"),
              "matryoshka": bool(getattr(vllm_config.model_config, "is_matryoshka", False)),
              "load_seconds": time.perf_counter() - started}
    target = state_dir / HOST_RECORD
    tmp = target.with_suffix(f".{me.pid}.tmp")
    tmp.write_text(json.dumps(record))
    os.chmod(tmp, 0o600)
    os.replace(tmp, target)

    def exit_host(code: int = 0) -> None:
        with contextlib.suppress(Exception):
            engine.engine_core.shutdown()
        with contextlib.suppress(OSError):
            if json.loads(target.read_text()).get("pid") == me.pid:
                target.unlink()
        with contextlib.suppress(OSError):
            if not config["address"].startswith("\0"):  # an abstract socket has no file
                os.unlink(config["address"])
        os._exit(code)

    signal.signal(signal.SIGTERM, lambda *_: exit_host(0))
    host = _Host(engine, llm, exit_host, config["idle_seconds"], max(2 * record["max_num_seqs"], 512))
    threading.Thread(target=host.idle_watch, args=(config.get("service"),), name="idle-watch", daemon=True).start()
    threading.Thread(target=host.engine_loop, name="engine-loop", daemon=True).start()
    print(f"engine host for {kwargs['model']} ready after {record['load_seconds']:.1f}s", flush=True)
    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError, ValueError):  # a client that failed the handshake (wrong key, gone)
            continue
        threading.Thread(target=host.serve_client, args=(conn,), name="client", daemon=True).start()


def _alive(identity: list) -> bool:
    """Whether the process (pid, start time) still runs."""
    try:
        process = psutil.Process(identity[0])
        return abs(process.create_time() - identity[1]) < 1e-3 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class _Client:
    """One attached run worker: the requests it has in the engine and its finished outputs not yet sent.

    Clients name their requests independently (two batches both have an "r0-0"), so the engine knows
    each request under the client's prefix, and outputs go back under the client's own id.
    """

    def __init__(self, number: int) -> None:
        self.prefix = f"c{number}:"
        self.mine: set[str] = set()  # engine ids
        self.finished: list[Any] = []

    def engine_id(self, request_id: str) -> str:
        return self.prefix + request_id


class _Host:
    """Several clients (batches of the same model) share one engine: each client's requests join the
    same running batch, so small batches fill the GPU together instead of one after the other.

    One thread steps the engine while any client has a request in it; every engine call (add, step,
    abort, embed) happens under one lock, since vLLM's engine is not thread-safe. A client's `step`
    adds its new requests and returns its outputs that finished since its last call, waiting for the
    next engine step when there are none yet, so each client still sees one round trip per step.
    """

    def __init__(self, engine: Any, llm: Any, exit_host: Any, idle_seconds: float, window: int):
        self.engine = engine
        self.llm = llm
        self.exit_host = exit_host
        self.idle_seconds = idle_seconds
        self.window = window  # requests unfinished in the engine that keep its scheduler full
        self.cond = threading.Condition()
        self.owners: dict[str, _Client] = {}  # request id -> the client that sent it
        self.steps = 0
        self.clients = 0
        self.attached = 0  # clients ever attached: each one's request-id prefix
        self.dead: str | None = None
        self.last_active = time.monotonic()

    def idle_watch(self, service: list | None) -> None:
        """Exit when idle for `idle_seconds`, or at once when idle and the service it belongs to is gone
        (a `vllm-batch start` killed with SIGKILL cannot stop its host; nobody else would use it)."""
        while True:
            time.sleep(1.0)
            with self.cond:
                unused = self.clients == 0
                idle = unused and time.monotonic() - self.last_active > self.idle_seconds
            if idle:
                print(f"idle for {self.idle_seconds}s; releasing the engine", flush=True)
                self.exit_host(0)
            if unused and service is not None and not _alive(service):
                print(f"the service (pid {service[0]}) is gone; releasing the engine", flush=True)
                self.exit_host(0)

    def _died(self, exc: BaseException) -> None:
        with self.cond:
            if self.dead is None:
                self.dead = f"the engine core died: {exc or type(exc).__name__}"
            self.cond.notify_all()

    def engine_loop(self) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        while True:
            with self.cond:
                while not self.owners and self.dead is None:
                    self.cond.wait()
                if self.dead is not None:
                    break
                try:
                    outputs = self.engine.step()
                except EngineDeadError as exc:
                    self.dead = f"the engine core died: {exc or type(exc).__name__}"
                    self.cond.notify_all()
                    break
                for output in outputs:
                    if output.finished:
                        client = self.owners.pop(output.request_id, None)
                        if client is not None:
                            client.mine.discard(output.request_id)
                            client.finished.append(plain_output(output))
                self.steps += 1
                self.cond.notify_all()
        # Tell every attached client (each learns it on its next call), then go: the next attach starts a new host.
        deadline = time.monotonic() + 10
        with self.cond:
            while self.clients and time.monotonic() < deadline:
                self.cond.wait(0.2)
        self.exit_host(1)

    def serve_client(self, conn: Connection) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        with self.cond:
            self.attached += 1
            client = _Client(self.attached)
            self.clients += 1
            print(f"a batch attached ({self.clients} attached)", flush=True)
        try:
            while True:
                message = conn.recv()
                if message[0] == "step":
                    with self.cond:
                        failures: list[tuple[str, str, str | None]] = []
                        for request_id, token_ids, spec in message[1]:
                            if self.dead is not None:
                                break
                            engine_id = client.engine_id(request_id)
                            try:
                                params = spec.build()  # a SamplingSpec: the client imports no vLLM
                            except admission_errors() as exc:  # vLLM's own checks of the parameters
                                failures.append((request_id, f"invalid sampling parameters: {exc}", "invalid_body"))
                                continue
                            try:
                                self.engine.add_request(engine_id, TokensPrompt(prompt_token_ids=token_ids), params)
                            except admission_errors() as exc:
                                failures.append((request_id, str(exc), None))
                                continue
                            except EngineDeadError as exc:
                                self.dead = f"the engine core died: {exc or type(exc).__name__}"
                                break
                            client.mine.add(engine_id)
                            self.owners[engine_id] = client
                        self.cond.notify_all()
                        target = self.steps + 1
                        while self.dead is None and client.mine and not client.finished and self.steps < target:
                            self.cond.wait()
                        finished, client.finished = client.finished, []
                        dead = self.dead
                    for output in finished:  # back under the client's own request id
                        output.request_id = output.request_id[len(client.prefix):]
                    if dead is not None:
                        conn.send(("dead", dead))
                        return
                    conn.send(("ok", finished, failures, self.share()))
                elif message[0] == "abort":
                    with self.cond:
                        self._abort(client, [client.engine_id(request_id) for request_id in message[1]])
                    conn.send(("ok",))
                elif message[0] == "embed":
                    with self.cond:
                        outputs = self.llm.embed([TokensPrompt(prompt_token_ids=ids) for ids in message[1]],
                                                 use_tqdm=False)
                    conn.send(("ok", [list(map(float, o.outputs.embedding)) for o in outputs]))
                elif message[0] == "shutdown":
                    conn.send(("ok",))
                    self.exit_host(0)
        except EngineDeadError as exc:  # during embed
            self._died(exc)
            with contextlib.suppress(OSError):
                conn.send(("dead", self.dead))
        except (EOFError, OSError):
            pass  # the client went away mid-batch (cancel, crash): its requests must not run on
        finally:
            with self.cond:
                if client.mine and self.dead is None:
                    with contextlib.suppress(EngineDeadError):
                        self._abort(client, list(client.mine))
                self.clients -= 1
                self.last_active = time.monotonic()
                self.cond.notify_all()
            with contextlib.suppress(OSError):
                conn.close()

    def share(self) -> int:
        """A client's share of the window: equal among the attached clients (the fairness policy).

        vLLM schedules in arrival order, so a client with the whole window in flight would put a
        window's worth of its requests ahead of every request of a batch that attaches after it; with
        equal shares, a small batch that joins a huge one has its requests running within one share's
        generation, and the huge one takes the whole window back when it is alone again.
        """
        return max(self.window // max(self.clients, 1), MIN_SHARE)

    def _abort(self, client: _Client, request_ids: list[str]) -> None:
        """Abort some of a client's requests, by engine id (caller holds the lock)."""
        ids = [request_id for request_id in request_ids if self.owners.get(request_id) is client]
        if ids:
            self.engine.abort_request(ids)
        for request_id in ids:
            self.owners.pop(request_id, None)
            client.mine.discard(request_id)
        gone = set(request_ids)
        client.finished = [output for output in client.finished if output.request_id not in gone]


if __name__ == "__main__":
    _serve(json.loads(sys.stdin.read()))
