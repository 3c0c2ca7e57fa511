"""The GPU resource: it owns the process's vLLM engine, keeps it fed, and decides when it is released.

Assets use it as `with engine.session(model, engine_args) as loaded:`; the resource decides whether
that loads, reuses or swaps the engine, attaches to the slot's warm engine host, and whether the
engine outlives the session (keep_loaded). What it hands out is a LoadedEngine
(resources/local_engine.py) or a HostedEngine (resources/engine_host_client.py): both run requests
through the one admission loop of resources/engine_loop.py.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dagster import ConfigurableResource, InitResourceContext

from resources import device_slots, engine_host_client, engine_processes
from resources.device_slots import EngineSlot, SlotLease
from resources.engine_host_client import HostedEngine
from resources.engine_types import EngineLoadError
from resources.engine_wire import same_kwargs
from resources.local_engine import LoadedEngine, build_llm

log = logging.getLogger(__name__)

Engine = LoadedEngine | HostedEngine


@dataclass
class ProcessEngine:
    """The process's one engine, its engine slot and its load in progress.

    A process drives one GPU (or one tensor-parallel group), and two engines would fight over its
    memory, so there is one of these per process (`VLLMEngine.process`): Dagster builds a new
    resource object for every run, and a long-lived process (the test session, a worker with
    keep_loaded) reuses the engine across them. Only the resource touches it.
    """

    loaded: Engine | None = None
    lease: SlotLease | None = None  # the engine slot this process holds while its engine lives
    saved_env: dict[str, str | None] = field(default_factory=dict)  # what the slot's env replaced
    private_locks: Path | None = None
    prefetch: Future | None = None
    loads: int = 0  # engines this process has loaded or attached to (a batch should need one)
    hosts: set[int] = field(default_factory=set)  # engine host pids this process attached to

    def held_slot(self) -> EngineSlot | None:
        return self.lease.slot if self.lease is not None and self.lease.held else None

    def wait_for_prefetch(self, *, raise_errors: bool = True) -> None:
        if self.prefetch is not None:
            pending, self.prefetch = self.prefetch, None
            try:
                pending.result()  # re-raises the prefetch's EngineLoadError, if any
            except Exception:
                if raise_errors:
                    raise

    def shutdown_engine(self) -> None:
        if self.loaded is not None:
            engine, self.loaded = self.loaded, None
            engine.shutdown()
            if engine.record_dir is not None:
                engine_processes.forget_engine(engine.record_dir)

    def release(self) -> None:
        """Shut the engine down, if one is loaded, and give its engine slot back."""
        self.shutdown_engine()
        if self.lease is not None:
            lease, self.lease = self.lease, None
            lease.release()
        for name, value in self.saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.saved_env.clear()

    def apply_slot_env(self, slot: EngineSlot) -> None:
        """Show the engine only its slot's devices. vLLM's engine core is a spawned child that reads these
        when it starts; this process itself never initialises CUDA (vLLM's front end queries NVML)."""
        for name, value in slot.env.items():
            self.saved_env.setdefault(name, os.environ.get(name))
            os.environ[name] = value


class VLLMEngine(ConfigurableResource):
    """Owns the vLLM engine: loaded on first use, reused for every chunk, released when the session ends.

    Assets that use it run in the `gpu` concurrency pool, so one engine holds a GPU at a time. A
    session for a different model swaps the engine: the old one is shut down before the new loads.
    With `keep_loaded`, the engine outlives the session (and the run) so the next batch of the same
    model in the same process skips the load.
    """

    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_num_seqs: int | None = None
    # None: eager on the CPU build, where torch.compile made the load ~8x slower and generation no
    # faster (docs/BENCHMARKS.md); CUDA graphs and torch.compile on a GPU.
    enforce_eager: bool | None = None
    seed: int = 0
    engine_args: str = "{}"

    process: ClassVar[ProcessEngine] = ProcessEngine()

    keep_loaded: bool = False
    # The warm engine (resources/engine_host_client.py): a host process keeps the engine between runs
    # and run workers drive it over a local socket. Needs state_dir. Off: the engine lives in the worker.
    engine_host: bool = False
    idle_seconds: int = 600
    # The service (`vllm-batch start`) whose runs these are: a host it starts ends when the service is gone.
    service_pid: int | None = None
    # Where each loaded engine records its processes, so the next load can kill those of a worker
    # that was SIGKILLed (see resources/engine_processes.py). None: no record is kept.
    state_dir: str | None = None
    # JSON output (response_format) without free whitespace between tokens: fewer tokens, and weak
    # models cannot loop on whitespace until max_tokens and leave the JSON unfinished.
    compact_json: bool = True
    # Several GPUs (resources/device_slots.py): `gpus` devices (None: every visible one) make
    # gpus / tensor_parallel_size engine slots; an engine holds a slot's lock in state_dir while it
    # lives. A batch runs on up to `engines_per_batch` slots that are free when it starts (None: all).
    gpus: int | None = None
    engines_per_batch: int | None = None

    def slots(self) -> list[EngineSlot]:
        """This machine's engine slots (EngineLoadError when the settings do not fit it)."""
        try:
            return device_slots.engine_slots(self.gpus, self.tensor_parallel_size)
        except device_slots.SlotConfigError as exc:
            raise EngineLoadError(str(exc)) from None

    def data_parallel(self) -> bool:
        """Whether a batch may run on more than one engine at once."""
        return self.engines_per_batch != 1 and len(self.slots()) > 1

    def host_dir(self, slot: EngineSlot) -> Path:
        """The engine host folder of a slot (slot 0's is the state folder itself, as with one GPU)."""
        assert self.state_dir is not None
        return Path(self.state_dir) / (f"slot-{slot.index}" if slot.index else "")

    def extra_slots(self, most: int) -> list[SlotLease]:
        """Up to `most` engine slots free right now besides this process's own (waited for first, if it has none)."""
        self.process.wait_for_prefetch()
        own = self._lease()
        others = [slot for slot in self.slots() if slot.index != own.slot.index]
        return device_slots.free_slots(self._lock_dir(), others, most)

    def hand_over_slot(self) -> SlotLease:
        """This process's own slot, for a worker process to run an engine on: its own engine is shut down first."""
        lease = self._lease()
        self.process.shutdown_engine()
        self.process.lease = None
        return lease

    def _lock_dir(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir)
        # No state folder (benchmarks, the test session's shared engine): slots are this process's alone.
        if self.process.private_locks is None:
            self.process.private_locks = Path(tempfile.mkdtemp(prefix="vbatch-slots-"))
        return self.process.private_locks

    def _lease(self, kwargs: dict[str, Any] | None = None) -> SlotLease:
        """The process's slot lease, taking a free slot (waiting for one) if it holds none."""
        if self.process.lease is None or not self.process.lease.held:
            slots = self.slots()
            prefer = drain = None
            if self.engine_host and self.state_dir and kwargs is not None:
                def prefer(slot: EngineSlot) -> bool:  # a warm host of this model: join its other clients
                    return self._host_runs(slot, kwargs) is True

                def drain(slot: EngineSlot) -> bool:  # a host of another model: its clients must finish first
                    return self._host_runs(slot, kwargs) is False

            if len(slots) > 1:
                log.info("taking a free engine slot (%d on this machine; waiting while all are held)", len(slots))
            self.process.lease = device_slots.acquire_slot(self._lock_dir(), slots, prefer, share=prefer, drain=drain)
            self.process.apply_slot_env(self.process.lease.slot)
        return self.process.lease

    def _host_runs(self, slot: EngineSlot, kwargs: dict[str, Any]) -> bool | None:
        """Whether the slot's engine host runs an engine with `kwargs` (None: no host is running)."""
        record = engine_host_client.read_host(self.host_dir(slot))
        return None if record is None else same_kwargs(record["kwargs"], kwargs)

    def engine_kwargs(self, model: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The keyword arguments for `vllm.LLM`, before `resolve_platform_defaults` (no vLLM import here)."""
        kwargs: dict[str, Any] = {
            "model": model,
            "dtype": self.dtype,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enforce_eager": self.enforce_eager,
            "seed": self.seed,
        }
        if self.max_model_len:
            kwargs["max_model_len"] = self.max_model_len
        if self.max_num_seqs:
            kwargs["max_num_seqs"] = self.max_num_seqs
        if self.compact_json:
            kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
        kwargs.update(json.loads(self.engine_args or "{}"))
        kwargs.update(extra or {})
        return kwargs

    def prefetch(self, model: str, extra_args: dict[str, Any] | None = None) -> Future[Engine]:
        """Start loading `model` in a background thread; the next session waits for it. Returns the load,
        done when the engine is ready.

        `vllm-batch run` uses this to overlap the engine load with Dagster's start-up and the input
        validation. Runs launched by the daemon don't: there the `gpu` pool decides when a run may
        touch the GPU, and only batch_chunks holds the pool slot.
        """
        if self.process.prefetch is None:
            pool = ThreadPoolExecutor(1, thread_name_prefix="engine-prefetch")
            self.process.prefetch = pool.submit(self._load, model, extra_args)
            pool.shutdown(wait=False)
        return self.process.prefetch

    @contextmanager
    def session(self, model: str, extra_args: dict[str, Any] | None = None) -> Iterator[Engine]:
        """The engine for `model` for the duration of the block; released after it unless keep_loaded.

        Releasing before the step ends matters: the `gpu` pool slot goes with the step, and the next
        batch (perhaps another model) starts loading the moment it is free.
        """
        loaded = self.load(model, extra_args)
        try:
            yield loaded
        finally:
            if not self.keep_loaded:
                self.process.release()

    def restart(self, model: str, extra_args: dict[str, Any] | None = None) -> Engine:
        """A new engine for `model` after the current one died (its processes are shut down first)."""
        log.warning("the engine for %s died; starting a new one", model)
        self.process.shutdown_engine()  # the slot stays this process's
        return self._load(model, extra_args)

    def load(self, model: str, extra_args: dict[str, Any] | None = None) -> Engine:
        """The engine for `model`, loading it (and first unloading another model or setting) if needed."""
        self.process.wait_for_prefetch()
        return self._load(model, extra_args)

    def _load(self, model: str, extra_args: dict[str, Any] | None) -> Engine:
        kwargs = self.engine_kwargs(model, extra_args)
        if self.process.loaded is not None and self.process.loaded.kwargs == kwargs and not self.process.loaded.dead:
            return self.process.loaded
        if model.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(model)):
            raise EngineLoadError(f"could not load model {model!r}: no such directory")
        self.process.shutdown_engine()  # a model swap keeps the process's slot
        lease = self._lease(kwargs)
        slot = lease.slot
        if self.engine_host and self.state_dir:
            if lease.shared and self._host_runs(slot, kwargs) is False:
                # This process shared the slot with the host's other clients, and now needs another
                # model (a swap): it waits for the slot on its own, as any batch for another model does.
                lease.release()
                self.process.lease = None
                lease = self._lease(kwargs)
                slot = lease.slot
            hosted = engine_host_client.attach(self.host_dir(slot), kwargs, self.idle_seconds,
                                               replace=not lease.shared, service_pid=self.service_pid)
            lease.share()  # the host runs this model now: other batches of it may join
            if hosted.host_pid not in self.process.hosts:
                self.process.loads += 1
                self.process.hosts.add(hosted.host_pid)
            self.process.loaded = hosted
            return hosted
        if self.state_dir:
            # Never two engines on one GPU: a warm host (of any model) on this slot goes before this one loads.
            engine_host_client.stop_host(self.host_dir(slot))
            engine_processes.reap_orphaned_engines(Path(self.state_dir))
        children_before = engine_processes.child_processes()
        started = time.perf_counter()
        llm = build_llm(kwargs)
        engine_processes.guard_engine(engine_processes.child_processes() - children_before)  # dies with us
        loaded = LoadedEngine(model, kwargs, llm, time.perf_counter() - started)
        self.process.loads += 1
        if self.state_dir:
            loaded.record_dir = Path(self.state_dir)
            started_processes = engine_processes.child_processes() - children_before
            engine_processes.record_engine(loaded.record_dir, started_processes, model)
        self.process.loaded = loaded
        return loaded

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        # A step that failed before its session began may still have a prefetched engine.
        if not self.keep_loaded:
            self.process.release()

    # ---- the process's engine, for the asset, the CLI and the data-parallel workers ----

    def held_slot(self) -> EngineSlot | None:
        """The engine slot this process holds (while its engine lives), if any."""
        return self.process.held_slot()

    def engines_loaded(self) -> int:
        """How many engines this process has loaded (or attached to) so far."""
        return self.process.loads

    @classmethod
    def release(cls) -> None:
        """Shut the process's engine down, if one is loaded, and give its engine slot back."""
        cls.process.release()

    @classmethod
    def discard(cls) -> None:
        """For a process about to exit: wait for a load in progress (its errors no longer matter), then shut
        the engine down, so no engine process outlives it and nothing prints after its last word."""
        cls.process.wait_for_prefetch(raise_errors=False)
        cls.process.release()

    @classmethod
    def adopt_slot(cls, slot: EngineSlot, lock_fd: int) -> None:
        """In a worker process: the slot whose lock its parent passed down (as `lock_fd`) is this process's."""
        cls.process.lease = SlotLease(slot, os.fdopen(lock_fd, "a+"))
        cls.process.apply_slot_env(slot)
