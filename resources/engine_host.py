"""A warm engine: one host process per data folder keeps a vLLM engine loaded between runs.

Every run the daemon launches is a new process, so an in-process engine is loaded again for every
batch. With the host on (`VBATCH_ENGINE_HOST`), the `engine` resource attaches to a host process
instead: the host owns `vllm.LLM`, the run worker drives its engine loop over a local socket (one
round trip per engine step), and the host outlives the run. The next batch of the same model
attaches in well under a second.

Lifetime rules (docs/ARCHITECTURE.md):
- one host per state folder, described by `host.json` (pid, start time, socket, engine kwargs); it
  is started and replaced under `host.lock`, so two workers never start two engines;
- a batch for another model (or other engine args) stops the host before the new engine loads, so
  the GPU memory is free first; so does an in-process engine load;
- an idle host (no client for `idle_seconds`) shuts its engine down and exits;
- several clients (batches of the same model) share the engine at once: their requests join one
  running batch, so small batches fill the GPU together. They hold the engine slot's lock shared; a
  batch for another model, or an engine in a process, needs it exclusively and waits for them
  (resources/device_slots.py), so there is still one engine per GPU;
- the host only steps the engine while a client has requests in it, and clients are `batch_chunks`
  steps holding the `gpu` pool, so GPU work still happens only inside the pool;
- a host left behind by a killed supervisor is found through `host.json` and stopped by the next
  load of another model, or exits when idle. If its engine core dies, the host exits and the
  client sees `EngineDied`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import psutil

from resources.vllm_engine import (
    EngineDied,
    EngineFailure,
    EngineLoadError,
    EngineRequest,
    admission_errors,
    plain_output,
    resolve_platform_defaults,
    watch_core_death,
)

log = logging.getLogger(__name__)

HOST_RECORD = "host.json"


def _same_kwargs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def read_host(state_dir: Path) -> dict | None:
    """The running host's record, or None if there is none (or its process is gone)."""
    try:
        record = json.loads((state_dir / HOST_RECORD).read_text())
        process = psutil.Process(record["pid"])
        if abs(process.create_time() - record["started"]) < 1e-3 and process.status() != psutil.STATUS_ZOMBIE:
            return record
    except (OSError, ValueError, KeyError, psutil.Error):
        pass
    return None


def stop_host(state_dir: Path, timeout: float = 60.0) -> bool:
    """Stop the host of this state folder (engine included) and wait until its memory is free."""
    record = read_host(state_dir)
    stopped = False
    if record is not None:
        processes = []
        for pid in [record["pid"], *record.get("engine_pids", [])]:
            with contextlib.suppress(psutil.Error):
                processes.append(psutil.Process(pid))
        with contextlib.suppress(OSError, EOFError, ConnectionError):
            with Client(record["address"], family="AF_UNIX", authkey=bytes.fromhex(record["authkey"])) as conn:
                conn.send(("shutdown",))
                conn.recv()
        _, alive = psutil.wait_procs(processes, timeout=timeout)
        for process in alive:  # a host that did not answer (hung, or busy with another client)
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=10)
        stopped = True
        log.warning("stopped the engine host of %s (pid %s)", record.get("model"), record["pid"])
    (state_dir / HOST_RECORD).unlink(missing_ok=True)
    return stopped


def stop_hosts(state_dir: Path) -> bool:
    """Stop the host of every engine slot (slot 0's lives in the state folder, slot N's in `slot-N/`)."""
    folders = [state_dir, *sorted(state_dir.glob("slot-*"))] if state_dir.is_dir() else []
    return any([stop_host(folder) for folder in folders])


class HostedEngine:
    """A run worker's handle on the host's engine: the same interface as `LoadedEngine`, without vLLM.

    Requests carry a `SamplingSpec` (`remote` tells the request builders so), outputs come back as
    `PlainOutput`, and the tokenizer is Hugging Face's own: the worker never imports vLLM or torch.
    """

    remote = True

    def __init__(self, record: dict, conn: Connection, load_seconds: float, tokenizer: Any):
        self.model: str = record["model"]
        self.kwargs: dict[str, Any] = record["kwargs"]
        self.host_pid: int = record["pid"]
        self.max_model_len: int = record["max_model_len"]
        self.max_num_seqs: int = record["max_num_seqs"]
        self.runner: str = record["runner"]
        self.matryoshka: bool = bool(record.get("matryoshka", False))  # trained for shortened embeddings
        self.load_seconds = load_seconds
        self.tokenizer = tokenizer
        self.conn = conn
        self.record_dir: Path | None = None
        self.requests_run = 0
        self.dead = False

    def _call(self, message: tuple, in_flight: dict[str, EngineRequest]) -> Any:
        try:
            self.conn.send(message)
            reply = self.conn.recv()
        except (OSError, EOFError) as exc:
            self.dead = True
            raise EngineDied(list(in_flight.values()), f"the engine host went away ({type(exc).__name__})") from exc
        if reply[0] == "dead":
            self.dead = True
            raise EngineDied(list(in_flight.values()), reply[1])
        return reply[1:]

    def stream(self, requests: Iterable[EngineRequest],
               in_flight: int | None = None) -> Iterator[tuple[EngineRequest, Any]]:
        """As `LoadedEngine.stream`: requests are sent with each step, finished outputs come back."""
        window = in_flight or max(2 * self.max_num_seqs, 512)
        pending: dict[str, EngineRequest] = {}
        source = iter(requests)
        exhausted = False
        try:
            while True:
                adds: list[tuple[str, list[int], Any]] = []
                while not exhausted and len(pending) + len(adds) < window:
                    request = next(source, None)
                    if request is None:
                        exhausted = True
                        break
                    request_id = f"r{request.key}-{self.requests_run}"
                    self.requests_run += 1
                    adds.append((request_id, request.prompt_token_ids, request.params))
                    pending[request_id] = request
                if not pending:
                    return
                outputs, failures = self._call(("step", adds), pending)
                for request_id, message, code in failures:
                    yield pending.pop(request_id), EngineFailure(message, code)
                for output in outputs:
                    yield pending.pop(output.request_id), output
        finally:
            if pending and not self.dead:
                with contextlib.suppress(OSError, EOFError):
                    self.conn.send(("abort", list(pending)))
                    self.conn.recv()

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Embedding vectors for token-id inputs (a pooling engine), in input order."""
        (vectors,) = self._call(("embed", inputs), {})
        return vectors

    def shutdown(self) -> None:
        """Detach: the host and its engine stay loaded for the next batch (a dead host is waited
        for, so that the next attach starts a new one instead of finding the dying one)."""
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.dead:
            with contextlib.suppress(psutil.Error):
                host = psutil.Process(self.host_pid)
                try:
                    host.wait(timeout=30)
                except psutil.TimeoutExpired:
                    host.kill()
                    host.wait(timeout=10)


def attach(state_dir: Path, kwargs: dict[str, Any], idle_seconds: int, start_timeout: float = 1800.0,
           replace: bool = True) -> HostedEngine:
    """The host's engine for `kwargs`: the running host if it has them, else a new host (after
    stopping one that runs another model, so its memory is free before the new model loads).

    `replace=False` (a client sharing the slot with others): a host of another model is not stopped.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (state_dir / "host.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker at a time decides, and starts at most one host
        record = read_host(state_dir)
        if record is not None and not _same_kwargs(record["kwargs"], kwargs):
            if not replace:
                raise EngineLoadError(f"the engine host of this GPU runs {record['model']!r}, "
                                      f"and other batches are using it")
            stop_host(state_dir)
            record = None
        if record is None:
            (state_dir / HOST_RECORD).unlink(missing_ok=True)
            from resources import engine_processes

            engine_processes.reap_orphaned_engines(state_dir)
            record = _start_host(state_dir, kwargs, idle_seconds, start_timeout)
    try:
        conn = Client(record["address"], family="AF_UNIX", authkey=bytes.fromhex(record["authkey"]))
    except (OSError, EOFError) as exc:
        raise EngineLoadError(f"could not reach the engine host of {kwargs['model']!r}: {exc}") from exc
    return HostedEngine(record, conn, time.perf_counter() - started, client_tokenizer(kwargs))


def client_tokenizer(kwargs: dict[str, Any]) -> Any:
    """The model's tokenizer for a run worker, without importing vLLM or torch where it can.

    vLLM's `get_tokenizer` returns Hugging Face's AutoTokenizer in the default tokenizer mode. In
    transformers 5 AutoTokenizer imports torch (through the model configuration classes: 10 s of a
    20 s import here), so for a model folder that names its tokenizer class the worker loads that
    class itself, as AutoTokenizer would (the "Fast" variant first); other cases use AutoTokenizer,
    and other modes (mistral, custom) vLLM's own.
    """
    name = kwargs.get("tokenizer") or kwargs["model"]
    trust_remote_code = kwargs.get("trust_remote_code", False)
    revision = kwargs.get("tokenizer_revision") or kwargs.get("revision")
    mode = kwargs.get("tokenizer_mode", "auto")
    if mode in ("auto", "hf"):
        tokenizer_class = _named_tokenizer_class(name)
        if tokenizer_class is not None:
            return tokenizer_class.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    if mode in ("auto", "hf", "slow"):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision,
                                             use_fast=mode != "slow")
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(name, trust_remote_code=trust_remote_code, revision=revision,
                         tokenizer_mode=kwargs["tokenizer_mode"])


def _named_tokenizer_class(name: str) -> Any:
    """The tokenizer class a local model folder names in tokenizer_config.json (None: let AutoTokenizer decide)."""
    try:
        config = json.loads((Path(name).expanduser() / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    class_name = config.get("tokenizer_class") if isinstance(config, dict) else None
    if not isinstance(class_name, str) or config.get("auto_map"):
        return None  # no class named, or the model's own code
    import transformers

    for candidate in ([class_name] if class_name.endswith("Fast") else [f"{class_name}Fast", class_name]):
        found = getattr(transformers, candidate, None)
        if found is not None:
            return found
    return None


def _socket_address(state_dir: Path, name: str) -> str:
    """The host's socket: a file in the state folder, unless that path is longer than AF_UNIX allows
    (108 bytes: a deep data folder); then a Linux abstract socket (no file; the authkey still guards it)."""
    path = str(state_dir / name)
    if len(os.fsencode(path)) < 100:
        return path
    if sys.platform.startswith("linux"):
        return f"\0vbatch-{name}"
    return str(Path(tempfile.gettempdir()) / name)


def _start_host(state_dir: Path, kwargs: dict[str, Any], idle_seconds: int, timeout: float) -> dict:
    authkey = secrets.token_hex(16)
    address = _socket_address(state_dir, f"host-{os.getpid()}-{secrets.token_hex(4)}.sock")
    log_path = state_dir / "host.log"
    with log_path.open("ab") as log_file:
        # Its own session: the host outlives the run worker that started it (and its process group).
        process = subprocess.Popen([sys.executable, "-m", "resources.engine_host"], stdin=subprocess.PIPE,
                                   stdout=log_file, stderr=log_file, start_new_session=True)
    assert process.stdin is not None
    process.stdin.write(json.dumps({"kwargs": kwargs, "idle_seconds": idle_seconds, "address": address,
                                    "authkey": authkey, "state_dir": str(state_dir)}).encode())
    process.stdin.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = read_host(state_dir)
        if record is not None and record["pid"] == process.pid:
            return record
        if process.poll() is not None:
            raise EngineLoadError(f"could not load model {kwargs['model']!r}: {_failure_reason(log_path)}")
        time.sleep(0.2)
    process.kill()
    raise EngineLoadError(f"could not load model {kwargs['model']!r}: the engine host did not start in {timeout:.0f}s")


def _failure_reason(log_path: Path) -> str:
    """Why a host exited while starting: the reason it wrote last, else the log's last line."""
    lines = log_path.read_text(errors="replace").strip().splitlines()
    reasons = [line.removeprefix(FAILED) for line in lines if line.startswith(FAILED)]
    return (reasons or lines or ["(no output)"])[-1]


# ---- the host process ---------------------------------------------------------------------------

FAILED = "engine host failed: "  # the line a host that cannot start writes last


def _serve(config: dict) -> None:
    from vllm import LLM

    state_dir = Path(config["state_dir"])
    kwargs = config["kwargs"]
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    started = time.perf_counter()
    try:
        llm = LLM(**resolve_platform_defaults(kwargs))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{FAILED}{reason}", flush=True)
        sys.exit(1)
    from resources.engine_processes import guard_engine

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
    host = _Host(engine, llm, exit_host, config["idle_seconds"])
    threading.Thread(target=host.idle_watch, name="idle-watch", daemon=True).start()
    threading.Thread(target=host.engine_loop, name="engine-loop", daemon=True).start()
    print(f"engine host for {kwargs['model']} ready after {record['load_seconds']:.1f}s", flush=True)
    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError, ValueError):  # a client that failed the handshake (wrong key, gone)
            continue
        threading.Thread(target=host.serve_client, args=(conn,), name="client", daemon=True).start()


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

    def __init__(self, engine: Any, llm: Any, exit_host: Any, idle_seconds: float):
        self.engine = engine
        self.llm = llm
        self.exit_host = exit_host
        self.idle_seconds = idle_seconds
        self.cond = threading.Condition()
        self.owners: dict[str, _Client] = {}  # request id -> the client that sent it
        self.steps = 0
        self.clients = 0
        self.attached = 0  # clients ever attached: each one's request-id prefix
        self.dead: str | None = None
        self.last_active = time.monotonic()

    def idle_watch(self) -> None:
        while True:
            time.sleep(1.0)
            with self.cond:
                idle = self.clients == 0 and time.monotonic() - self.last_active > self.idle_seconds
            if idle:
                print(f"idle for {self.idle_seconds}s; releasing the engine", flush=True)
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
                    conn.send(("ok", finished, failures))
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
