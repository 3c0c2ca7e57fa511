"""Data parallel: one batch's chunks shared among several engines, one worker process per engine slot.

The `batch_chunks` step holds the slots' locks (resources/device_slots.py) and starts one worker per
slot (`python -m batch_pipeline.domain.data_parallel`), passing it the slot's lock and one end of a socket
pair. Each worker loads its engine on its slot's devices and runs `run_chunks` over the chunks it
claims from the step: it asks for the next chunk only when its in-flight window needs requests, so
a faster engine takes more chunks. Every chunk is handed out once and written once by the worker
that claimed it (the atomic checkpoint); `batch_results` merges the chunk files in order as always.

Until every engine is ready, one takes at most its fair share of the chunks (the first engine loaded
would otherwise fill its in-flight window with all of a small batch); after that, whoever asks first.
A worker that dies gives its unwritten chunks back to the queue; the workers still claiming take
them. Chunks nobody could run are missing at the end, the step fails, and the run retry resumes
them. A cancelled step stops its workers (SIGTERM: each aborts its requests and shuts its engine
down); a worker whose step dies gets SIGTERM from the kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, cast

from batch_pipeline.domain.chunks import ChunkJob, ChunkReport, run_chunks
from batch_pipeline.domain.response_reuse import ResponseReuse
from resources.device_slots import EngineSlot, SlotLease
from resources.engine_processes import engine_process_facts
from resources.engine_types import EngineLoadError
from resources.response_cache import ResponseCache
from resources.storage import BatchPaths, BatchStorage
from resources.vllm_engine import VLLMEngine

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_STOP_SECONDS = 60.0  # a stopping worker aborts its requests and shuts its engine down within this


@dataclass
class EngineWorker:
    """One worker process and what the step knows about it."""

    slot: EngineSlot
    process: subprocess.Popen
    conn: Connection
    claimed: set[int] = field(default_factory=set)  # handed out, not written yet
    claims: int = 0
    chunks_written: int = 0
    load_seconds: float | None = None
    engine_processes: list[dict] = field(default_factory=list)  # what the engine's processes were given
    error: str | None = None
    load_failed: bool = False

    def summary(self) -> dict[str, Any]:
        return {"slot": self.slot.index, "devices": list(self.slot.devices), "pid": self.process.pid,
                "load_seconds": None if self.load_seconds is None else round(self.load_seconds, 3),
                "chunks": self.chunks_written, "engine_processes": self.engine_processes, "error": self.error}


def run_chunks_data_parallel(
    engine: VLLMEngine,
    leases: list[SlotLease],
    storage: BatchStorage,
    job: ChunkJob,
    *,
    model: str,
    engine_args: dict,
    todo: list[int],
    on_written: Callable[[ChunkReport], None],
    on_first_output: Callable[[], None] | None = None,
    on_ready: Callable[[EngineWorker], None] | None = None,
    reuse: ResponseReuse | None = None,
) -> list[dict[str, Any]]:
    """Run the chunks `todo` of `job` on one engine per lease; returns one summary per engine.

    Raises EngineLoadError when no engine could load. The leases stay the caller's to release.
    """
    batch_id = job.batch_id
    queue = deque(sorted(todo))
    config = {"engine": {**engine.model_dump(), "keep_loaded": False, "engine_host": False},
              "model": model, "engine_args": engine_args, "storage": storage.model_dump(), "batch_id": batch_id,
              "model_name": job.model_name, "chunk_size": job.chunk_size, "total": job.total,
              # Each worker answers from the response cache too, under the step's key context.
              "cache": None if reuse is None else {"resource": reuse.cache.model_dump(), "context": reuse.context}}
    workers: list[EngineWorker] = []
    try:
        for lease in leases:
            workers.append(_start_worker(lease, config))
        live = {worker.conn: worker for worker in workers}
        # Until every engine has loaded (or failed), one may take at most its fair share: the first engine
        # ready would otherwise fill its in-flight window with the whole of a small batch.
        share = -(-len(queue) // len(workers))

        def all_ready() -> bool:
            return all(w.load_seconds is not None or w.error or w.conn not in live for w in workers)
        while live:
            for ready in wait(list(live)):
                conn = cast(Connection, ready)
                worker = live[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    del live[conn]
                    _worker_gone(worker, queue, storage.batch(batch_id))
                    continue
                kind = message[0]
                if kind == "claim":
                    index = queue.popleft() if queue and (worker.claims < share or all_ready()) else None
                    if index is not None:
                        worker.claimed.add(index)
                        worker.claims += 1
                    conn.send(index)
                elif kind == "written":
                    report = ChunkReport(**message[1])
                    worker.claimed.discard(report.index)
                    worker.chunks_written += 1
                    on_written(report)
                elif kind == "ready":
                    worker.load_seconds, worker.engine_processes = message[1], message[2]
                    if on_ready is not None:
                        on_ready(worker)
                elif kind == "first_output":
                    if on_first_output is not None:
                        on_first_output()
                        on_first_output = None
                elif kind in ("load_error", "error"):
                    worker.error = message[1]
                    worker.load_failed = kind == "load_error"
        if all(worker.load_failed for worker in workers):
            raise EngineLoadError(workers[0].error or "no engine could be loaded")
        return [worker.summary() for worker in workers]
    finally:
        _stop(workers)


def _start_worker(lease: SlotLease, config: dict) -> EngineWorker:
    import socket

    ours, theirs = socket.socketpair()
    conn_fd = theirs.fileno()
    env = dict(os.environ, **lease.slot.env)
    # The worker imports this very code, wherever the step's process found it.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    with theirs:
        process = subprocess.Popen(
            [sys.executable, "-m", "batch_pipeline.domain.data_parallel"], stdin=subprocess.PIPE, env=env,
            stdout=2,  # vLLM logs to stdout; the step's stdout may be a result (`vllm-batch run --json`)
            pass_fds=(conn_fd, lease.fileno()))
    assert process.stdin is not None
    slot = {"index": lease.slot.index, "devices": list(lease.slot.devices), "platform": lease.slot.platform,
            "env": lease.slot.env}
    process.stdin.write(json.dumps({**config, "slot": slot, "conn_fd": conn_fd,
                                    "lock_fd": lease.fileno()}).encode())
    process.stdin.close()
    log.info("engine worker %d started on %s", process.pid, lease.slot.describe())
    return EngineWorker(lease.slot, process, Connection(ours.detach()))


def _worker_gone(worker: EngineWorker, queue: deque[int], paths: BatchPaths) -> None:
    """A worker ended: its chunks claimed and not written go back to the front of the queue."""
    code = worker.process.wait()
    lost = sorted(index for index in worker.claimed if not paths.chunk(index).exists())
    worker.claimed.clear()
    if lost:
        queue.extendleft(reversed(lost))
    if code != 0 and worker.error is None:
        worker.error = f"the engine worker on {worker.slot.describe()} exited with {code}"
    if worker.error:
        log.warning("%s; %d unfinished chunk(s) go back to the queue", worker.error, len(lost))


def _stop(workers: list[EngineWorker]) -> None:
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_SECONDS
    for worker in workers:
        try:
            worker.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
        with contextlib.suppress(OSError):
            worker.conn.close()


# ---- the worker process ---------------------------------------------------------------------------


def _serve(config: dict) -> None:
    if sys.platform.startswith("linux"):
        # SIGTERM when the step's process dies, even by SIGKILL: no engine outlives its step for long.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    def stop(*_: object) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, stop)
    conn = Connection(config["conn_fd"])
    VLLMEngine.adopt_slot(EngineSlot(**{**config["slot"], "devices": tuple(config["slot"]["devices"])}), config["lock_fd"])
    engine = VLLMEngine(**config["engine"])
    paths = BatchStorage(**config["storage"]).batch(config["batch_id"])
    model, engine_args = config["model"], config["engine_args"]
    try:
        try:
            loaded = engine.load(model, engine_args)
        except EngineLoadError as exc:
            conn.send(("load_error", str(exc)))
            return
        conn.send(("ready", loaded.load_seconds, engine_process_facts(list(config["slot"]["env"]))))

        def claim() -> int | None:
            conn.send(("claim",))
            return conn.recv()

        job = ChunkJob(paths, config["batch_id"], config["model_name"], config["chunk_size"], config["total"])
        cache = config.get("cache")
        reuse = None if cache is None else ResponseReuse(ResponseCache(**cache["resource"]), cache["context"],
                                                         config["batch_id"], config["chunk_size"])
        run_chunks(loaded, job, lambda report: conn.send(("written", asdict(report))),
                   restart=lambda: engine.restart(model, engine_args),
                   on_first_output=lambda: conn.send(("first_output",)), claim=claim, responses=reuse)
        if reuse is not None:
            reuse.flush()
    except (EOFError, OSError):
        pass  # the step went away: nothing to report to
    except Exception as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}".splitlines()[0]))
        raise
    finally:
        VLLMEngine.release()


if __name__ == "__main__":
    _serve(json.loads(sys.stdin.read()))
