"""A run worker's side of the warm engine: find, start, attach to and stop the engine host of a slot.

Every run the daemon launches is a new process, so an in-process engine is loaded again for every
batch. With the host (the default under `vllm-batch start`), the `engine` resource attaches to a host
process instead (resources/engine_host_server.py): the host owns `vllm.LLM`, the run worker drives
the admission loop over a local socket (one round trip per engine step), and the host outlives the
run. The next batch of the same model attaches in well under a second.

Lifetime rules (docs/ARCHITECTURE.md):
- one host per state folder, described by `host.json` (pid, start time, socket, engine kwargs); it
  is started and replaced under `host.lock`, so two workers never start two engines;
- a batch for another model (or other engine args) stops the host before the new engine loads, so
  the GPU memory is free first; so does an in-process engine load;
- an idle host (no client for `idle_seconds`) shuts its engine down and exits;
- several clients (batches of the same model) share the engine at once: their requests join one
  running batch, each client keeping an equal share of the engine's window in flight. They hold
  the engine slot's lock shared; a batch for another model, or an engine in a process, needs it
  exclusively and waits for them (resources/device_slots.py), so there is still one engine per GPU;
- a host left behind by a killed supervisor is found through `host.json` and stopped by the next
  load of another model, or exits when idle. If its engine core dies, the host exits and the
  client sees `EngineDied`.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

import psutil

from resources import engine_processes
from resources.engine_loop import EngineGone, Streaming
from resources.engine_types import EngineDied, EngineFailure, EngineLoadError, EngineRequest
from resources.engine_wire import FAILED, HOST_RECORD, same_kwargs

log = logging.getLogger(__name__)


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


class HostTransport:
    """The admission loop's transport to an engine host: one round trip per engine step."""

    def __init__(self, conn: Connection, window: int):
        self.conn = conn
        self._window = window  # the host's answer: this client's share of the engine's window

    def call(self, message: tuple) -> tuple:
        try:
            self.conn.send(message)
            reply = self.conn.recv()
        except (OSError, EOFError) as exc:
            raise EngineGone(f"the engine host went away ({type(exc).__name__})") from exc
        if reply[0] == "dead":
            raise EngineGone(reply[1])
        return reply[1:]

    def exchange(self, adds: list[tuple[str, EngineRequest]]) -> tuple[list[Any], list[tuple[str, EngineFailure]]]:
        outputs, failures, self._window = self.call(
            ("step", [(request_id, request.prompt_token_ids, request.params) for request_id, request in adds]))
        return outputs, [(request_id, EngineFailure(message, code)) for request_id, message, code in failures]

    def window(self) -> int:
        return self._window

    def abort(self, request_ids: list[str]) -> None:
        with contextlib.suppress(EngineGone):
            self.call(("abort", request_ids))


class HostedEngine(Streaming):
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
        self.record_dir: Path | None = None
        self.dead = False
        self._ids = itertools.count()
        self._host = HostTransport(conn, max(2 * self.max_num_seqs, 512))
        self._transport = self._host

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Embedding vectors for token-id inputs (a pooling engine), in input order."""
        try:
            (vectors,) = self._host.call(("embed", inputs))
        except EngineGone as exc:
            self.dead = True
            raise EngineDied([], str(exc)) from exc
        return vectors

    def shutdown(self) -> None:
        """Detach: the host and its engine stay loaded for the next batch (a dead host is waited
        for, so that the next attach starts a new one instead of finding the dying one)."""
        with contextlib.suppress(OSError):
            self._host.conn.close()
        if self.dead:
            with contextlib.suppress(psutil.Error):
                host = psutil.Process(self.host_pid)
                try:
                    host.wait(timeout=30)
                except psutil.TimeoutExpired:
                    host.kill()
                    host.wait(timeout=10)


def attach(state_dir: Path, kwargs: dict[str, Any], idle_seconds: int, start_timeout: float = 1800.0,
           replace: bool = True, service_pid: int | None = None) -> HostedEngine:
    """The host's engine for `kwargs`: the running host if it has them, else a new host (after
    stopping one that runs another model, so its memory is free before the new model loads).

    `replace=False` (a client sharing the slot with others): a host of another model is not stopped.
    `service_pid`: the service a new host belongs to (`vllm-batch start`); the host ends when it is gone.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (state_dir / "host.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker at a time decides, and starts at most one host
        record = read_host(state_dir)
        if record is not None and not same_kwargs(record["kwargs"], kwargs):
            if not replace:
                raise EngineLoadError(f"the engine host of this GPU runs {record['model']!r}, "
                                      f"and other batches are using it")
            stop_host(state_dir)
            record = None
        if record is None:
            (state_dir / HOST_RECORD).unlink(missing_ok=True)
            engine_processes.reap_orphaned_engines(state_dir)
            record = _start_host(state_dir, kwargs, idle_seconds, start_timeout, service_pid)
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


def _start_host(state_dir: Path, kwargs: dict[str, Any], idle_seconds: int, timeout: float,
                service_pid: int | None) -> dict:
    service = None
    if service_pid is not None:
        with contextlib.suppress(psutil.Error):  # (pid, start time): a later process with the pid is not it
            service = [service_pid, psutil.Process(service_pid).create_time()]
    authkey = secrets.token_hex(16)
    address = _socket_address(state_dir, f"host-{os.getpid()}-{secrets.token_hex(4)}.sock")
    log_path = state_dir / "host.log"
    with log_path.open("ab") as log_file:
        # Its own session: the host outlives the run worker that started it (and its process group).
        process = subprocess.Popen([sys.executable, "-m", "resources.engine_host_server"], stdin=subprocess.PIPE,
                                   stdout=log_file, stderr=log_file, start_new_session=True)
    assert process.stdin is not None
    process.stdin.write(json.dumps({"kwargs": kwargs, "idle_seconds": idle_seconds, "address": address,
                                    "authkey": authkey, "state_dir": str(state_dir),
                                    "service": service}).encode())
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
