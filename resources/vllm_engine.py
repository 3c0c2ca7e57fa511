"""The GPU resource: it owns the process's vLLM engine, keeps it fed, and decides when it is released.

Assets use it as `with engine.session(model, engine_args) as loaded:`; the resource decides whether
that loads, reuses or swaps the engine, and whether the engine outlives the session (keep_loaded).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dagster import ConfigurableResource, InitResourceContext

from resources import device_slots, engine_processes
from resources.device_slots import EngineSlot, SlotLease

if TYPE_CHECKING:
    from vllm import LLM, RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class EngineLoadError(Exception):
    """The model could not be loaded; the message says which model and why, in one line."""


@dataclass(slots=True)
class EngineRequest:
    """One request ready for the engine: token ids and sampling parameters."""

    key: int
    prompt_token_ids: list[int]
    params: SamplingParams
    url: str
    wants_logprobs: bool
    top_logprobs: int
    # Request fields the response object repeats (the Responses API echoes its parameters); never sent to vLLM.
    echo: dict[str, Any] | None = None


class EngineDied(Exception):
    """The engine's core process died mid-stream; `in_flight` are the requests it had not finished."""

    def __init__(self, in_flight: list[EngineRequest], reason: str):
        super().__init__(f"the engine died with {len(in_flight)} requests in flight: {reason}")
        self.in_flight = in_flight


@dataclass(slots=True)
class EngineFailure:
    """A request the engine refused at admission (e.g. vLLM's own parameter checks).

    `code`: the line's error code when it is not `engine_error` (invalid sampling parameters that an
    engine host found, since its clients build no `SamplingParams` of their own).
    """

    message: str
    code: str | None = None


# ---- what crosses the engine host's socket: plain data, so that run workers never import vLLM ----
# A run worker attached to a warm host imports neither vLLM nor torch (about 25 s per run on an H100
# host, where twenty small batches paid it twenty times): it sends sampling parameters as a
# SamplingSpec, the host builds vLLM's SamplingParams, and outputs come back as PlainOutput.


@dataclass(slots=True)
class SamplingSpec:
    """vLLM `SamplingParams` keyword arguments, built into the real thing by the engine host."""

    kwargs: dict[str, Any]
    structured: dict[str, Any] | None = None  # StructuredOutputsParams keyword arguments

    @property
    def n(self) -> int:
        return int(self.kwargs.get("n") or 1)

    def build(self) -> SamplingParams:
        """vLLM's SamplingParams (FINAL_ONLY outputs); one of `admission_errors()` for parameters vLLM refuses."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = StructuredOutputsParams(**self.structured) if self.structured else None
        return SamplingParams(**self.kwargs, structured_outputs=structured, output_kind=RequestOutputKind.FINAL_ONLY)


@dataclass(slots=True)
class PlainLogprob:
    logprob: float
    rank: int | None
    decoded_token: str | None


@dataclass(slots=True)
class PlainCompletion:
    """The parts of vLLM's CompletionOutput that the OpenAI bodies read."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, PlainLogprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class PlainOutput:
    """The parts of vLLM's RequestOutput that the pipeline reads."""

    request_id: str
    outputs: list[PlainCompletion]
    num_cached_tokens: int | None = None
    finished: bool = True


def plain_output(output: Any) -> PlainOutput:
    """A finished vLLM RequestOutput as plain data (in the engine host, before it is sent)."""
    completions = []
    for choice in output.outputs:
        logprobs = None
        if choice.logprobs is not None:
            logprobs = [{token: PlainLogprob(float(lp.logprob), lp.rank, lp.decoded_token)
                         for token, lp in position.items()} for position in choice.logprobs]
        completions.append(PlainCompletion(choice.index, choice.text, list(choice.token_ids), logprobs,
                                           choice.finish_reason, choice.stop_reason))
    return PlainOutput(output.request_id, completions, getattr(output, "num_cached_tokens", None), output.finished)


class LoadedEngine:
    """A loaded `vllm.LLM` plus what the pipeline needs to know about it."""

    def __init__(self, model: str, kwargs: dict[str, Any], llm: LLM, load_seconds: float):
        self.model = model
        self.kwargs = kwargs
        self.llm = llm
        self.load_seconds = load_seconds
        self.tokenizer = llm.get_tokenizer()
        config = llm.llm_engine.vllm_config
        self.max_model_len: int = config.model_config.max_model_len
        self.max_num_seqs: int = config.scheduler_config.max_num_seqs
        self.runner: str = getattr(config.model_config, "runner_type", "generate")
        # Trained for shortened embeddings (OpenAI's `dimensions`).
        self.matryoshka: bool = bool(getattr(config.model_config, "is_matryoshka", False))
        self.requests_run = 0
        self.record_dir: Path | None = None
        self.dead = False
        self._watching = watch_core_death(llm)

    def stream(self, requests: Iterable[EngineRequest],
               in_flight: int | None = None) -> Iterator[tuple[EngineRequest, RequestOutput | EngineFailure]]:
        """Run `requests` and yield (request, RequestOutput | EngineFailure) as each one finishes.

        Requests are admitted lazily, keeping `in_flight` of them unfinished so that the scheduler
        always has a full queue: the engine never drains at a chunk boundary, and memory stays
        bounded however long the input is. If the consumer stops early (cancel, crash), the
        requests still in the engine are aborted.
        """
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        engine = self.llm.llm_engine
        window = in_flight or max(2 * self.max_num_seqs, 512)
        pending: dict[str, EngineRequest] = {}
        source = iter(requests)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < window:
                    request = next(source, None)
                    if request is None:
                        exhausted = True
                        break
                    request_id = f"r{request.key}-{self.requests_run}"
                    self.requests_run += 1
                    try:
                        # Outputs carry the id given here (add_request returns an internal variant).
                        engine.add_request(
                            request_id, TokensPrompt(prompt_token_ids=request.prompt_token_ids), request.params
                        )
                    except admission_errors() as exc:  # vLLM's checks of this request's prompt and params
                        yield request, EngineFailure(str(exc))
                        continue
                    except EngineDeadError as exc:
                        pending[request_id] = request
                        raise self._died(pending, exc) from exc
                    pending[request_id] = request
                if not pending:
                    if exhausted:
                        return
                    continue
                try:
                    outputs = engine.step()
                except EngineDeadError as exc:
                    raise self._died(pending, exc) from exc
                for output in outputs:
                    if output.finished:
                        yield pending.pop(output.request_id), cast("RequestOutput", output)
        finally:
            if pending:
                engine.abort_request(list(pending))

    def _died(self, pending: dict[str, EngineRequest], exc: Exception) -> EngineDied:
        self.dead = True
        died = EngineDied(list(pending.values()), str(exc) or type(exc).__name__)
        pending.clear()  # nothing to abort in a dead engine
        return died

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Embedding vectors for token-id inputs (a pooling engine), in input order."""
        from vllm.inputs import TokensPrompt

        outputs = self.llm.embed([TokensPrompt(prompt_token_ids=ids) for ids in inputs], use_tqdm=False)
        return [list(map(float, output.outputs.embedding)) for output in outputs]

    def shutdown(self) -> None:
        """Stop the engine core processes and free the model's memory."""
        self._watching.set()
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # shutting down must not mask the error that led here
            log.warning("engine shutdown raised %s", exc)
        del self.llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def admission_errors() -> tuple[type[Exception], ...]:
    """What `add_request` raises for a request it refuses (too long, a token id out of the vocabulary, ...).

    vLLM 0.32's VLLMValidationError is no ValueError (older vLLM raised ValueError): catching only
    ValueError let one refused request fail the whole step.
    """
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMClientError)


def watch_core_death(llm: LLM) -> threading.Event:
    """Unblock a step waiting on an engine core process that died; set the returned event to stop watching.

    vLLM's client notices a dead core (its monitor thread marks it dead and shuts the client down),
    but its output thread may then exit without queueing an error, and `step()` waits forever for an
    output that never comes (seen on the CPU build when EngineCore is killed mid-batch). Queueing the
    error ourselves turns that into the EngineDeadError the stream handles.
    """
    stop = threading.Event()
    core = llm.llm_engine.engine_core
    resources, outputs = getattr(core, "resources", None), getattr(core, "outputs_queue", None)
    if resources is None or outputs is None:
        return stop  # an in-process core: nothing to watch

    def watch() -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        while not stop.wait(1.0):
            if getattr(resources, "engine_dead", False):
                outputs.put_nowait(EngineDeadError())
                return

    threading.Thread(target=watch, name="engine-core-watch", daemon=True).start()
    return stop


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def resolve_platform_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The `vllm.LLM` arguments with the platform's defaults filled in, in the process that loads the
    engine (it imports vLLM anyway; a run worker attached to an engine host never does).

    - dtype "auto" is float32 on the CPU build: vLLM's bfloat16 CPU kernels die with SIGILL on some
      batch shapes (seen on Sapphire Rapids); float32 ran every shape tried.
    - enforce_eager None: eager on the CPU build, where torch.compile made the load ~8x slower and
      generation no faster (docs/BENCHMARKS.md); CUDA graphs and torch.compile on a GPU.
    - no chunked prefill on the CPU build: after a partial prefill step vLLM discards the sampled
      token and rewinds a seeded request's generator offset, which CPU generators lack ("CPU
      Generator does not use offset" killed the engine core as soon as seeded requests filled a
      step). Whole prefills never discard a token, so `seed` works and reproduces.
    """
    resolved = dict(kwargs)
    on_cpu = _on_cpu()
    if resolved.get("dtype", "auto") == "auto" and on_cpu:
        resolved["dtype"] = "float32"
    if resolved.get("enforce_eager") is None:
        resolved["enforce_eager"] = on_cpu
    if on_cpu:
        resolved.setdefault("enable_chunked_prefill", False)
    return resolved


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

    keep_loaded: bool = False
    # The warm engine (resources/engine_host.py): a host process keeps the engine between runs and
    # run workers drive it over a local socket. Needs state_dir. Off: the engine lives in the worker.
    engine_host: bool = False
    idle_seconds: int = 600
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
        if _slot.prefetch is not None:
            pending, _slot.prefetch = _slot.prefetch, None
            pending.result()
        own = self._lease()
        others = [slot for slot in self.slots() if slot.index != own.slot.index]
        return device_slots.free_slots(self._lock_dir(), others, most)

    def hand_over_slot(self) -> SlotLease:
        """This process's own slot, for a worker process to run an engine on: its own engine is shut down first."""
        lease = self._lease()
        _shutdown_engine()
        _slot.lease = None
        return lease

    def _lock_dir(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir)
        # No state folder (benchmarks, the test session's shared engine): slots are this process's alone.
        if _slot.private_locks is None:
            _slot.private_locks = Path(tempfile.mkdtemp(prefix="vbatch-slots-"))
        return _slot.private_locks

    def _lease(self, kwargs: dict[str, Any] | None = None) -> SlotLease:
        """The process's slot lease, taking a free slot (waiting for one) if it holds none."""
        if _slot.lease is None or not _slot.lease.held:
            slots = self.slots()
            prefer = drain = None
            if self.engine_host and self.state_dir and kwargs is not None:
                def prefer(slot: EngineSlot) -> bool:  # a warm host of this model: join its other clients
                    return self._host_runs(slot, kwargs) is True

                def drain(slot: EngineSlot) -> bool:  # a host of another model: its clients must finish first
                    return self._host_runs(slot, kwargs) is False

            if len(slots) > 1:
                log.info("taking a free engine slot (%d on this machine; waiting while all are held)", len(slots))
            _slot.lease = device_slots.acquire_slot(self._lock_dir(), slots, prefer, share=prefer, drain=drain)
            _apply_slot_env(_slot.lease.slot)
        return _slot.lease

    def _host_runs(self, slot: EngineSlot, kwargs: dict[str, Any]) -> bool | None:
        """Whether the slot's engine host runs an engine with `kwargs` (None: no host is running)."""
        from resources import engine_host

        record = engine_host.read_host(self.host_dir(slot))
        return None if record is None else engine_host._same_kwargs(record["kwargs"], kwargs)

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

    def prefetch(self, model: str, extra_args: dict[str, Any] | None = None) -> None:
        """Start loading `model` in a background thread; the next session waits for it.

        `vllm-batch run` uses this to overlap the engine load with Dagster's start-up and the input
        validation. Runs launched by the daemon don't: there the `gpu` pool decides when a run may
        touch the GPU, and only batch_chunks holds the pool slot.
        """
        if _slot.prefetch is None:
            pool = ThreadPoolExecutor(1, thread_name_prefix="engine-prefetch")
            _slot.prefetch = pool.submit(self._load, model, extra_args)
            pool.shutdown(wait=False)

    @contextmanager
    def session(self, model: str, extra_args: dict[str, Any] | None = None) -> Iterator[LoadedEngine]:
        """The engine for `model` for the duration of the block; released after it unless keep_loaded.

        Releasing before the step ends matters: the `gpu` pool slot goes with the step, and the next
        batch (perhaps another model) starts loading the moment it is free.
        """
        loaded = self.load(model, extra_args)
        try:
            yield loaded
        finally:
            if not self.keep_loaded:
                release_engine()

    def restart(self, model: str, extra_args: dict[str, Any] | None = None) -> LoadedEngine:
        """A new engine for `model` after the current one died (its processes are shut down first)."""
        log.warning("the engine for %s died; starting a new one", model)
        _shutdown_engine()  # the slot stays this process's
        return self._load(model, extra_args)

    def load(self, model: str, extra_args: dict[str, Any] | None = None) -> LoadedEngine:
        """The engine for `model`, loading it (and first unloading another model or setting) if needed."""
        if _slot.prefetch is not None:
            pending, _slot.prefetch = _slot.prefetch, None
            pending.result()  # re-raises the prefetch's EngineLoadError, if any
        return self._load(model, extra_args)

    def _load(self, model: str, extra_args: dict[str, Any] | None) -> LoadedEngine:
        kwargs = self.engine_kwargs(model, extra_args)
        if _slot.loaded is not None and _slot.loaded.kwargs == kwargs and not _slot.loaded.dead:
            return _slot.loaded
        if model.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(model)):
            raise EngineLoadError(f"could not load model {model!r}: no such directory")
        _shutdown_engine()  # a model swap keeps the process's slot
        lease = self._lease(kwargs)
        slot = lease.slot
        if self.engine_host and self.state_dir:
            from resources import engine_host

            if lease.shared and self._host_runs(slot, kwargs) is False:
                # This process shared the slot with the host's other clients, and now needs another
                # model (a swap): it waits for the slot on its own, as any batch for another model does.
                lease.release()
                _slot.lease = None
                lease = self._lease(kwargs)
                slot = lease.slot
            hosted = engine_host.attach(self.host_dir(slot), kwargs, self.idle_seconds, replace=not lease.shared)
            lease.share()  # the host runs this model now: other batches of it may join
            if hosted.host_pid not in _slot.hosts:
                _slot.loads += 1
                _slot.hosts.add(hosted.host_pid)
            _slot.loaded = cast("LoadedEngine", hosted)
            return _slot.loaded
        if self.state_dir:
            from resources import engine_host

            # Never two engines on one GPU: a warm host (of any model) on this slot goes before this one loads.
            engine_host.stop_host(self.host_dir(slot))
            engine_processes.reap_orphaned_engines(Path(self.state_dir))
        children_before = engine_processes.child_processes()
        started = time.perf_counter()
        try:
            from vllm import LLM

            llm = LLM(**resolve_platform_defaults(kwargs))
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineLoadError(f"could not load model {model!r}: {reason}") from exc
        engine_processes.guard_engine(engine_processes.child_processes() - children_before)  # dies with us
        loaded = LoadedEngine(model, kwargs, llm, time.perf_counter() - started)
        _slot.loads += 1
        if self.state_dir:
            loaded.record_dir = Path(self.state_dir)
            started_processes = engine_processes.child_processes() - children_before
            engine_processes.record_engine(loaded.record_dir, started_processes, model)
        _slot.loaded = loaded
        return loaded

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        # A step that failed before its session began may still have a prefetched engine.
        if not self.keep_loaded:
            release_engine()


@dataclass
class _EngineSlot:
    """The process's one engine (and its load in progress). A process drives one GPU (or one
    tensor-parallel group), and two engines would fight over its memory; kept at module level so a
    long-lived process (the test session, a worker with keep_loaded) reuses it across runs."""

    loaded: LoadedEngine | None = None
    lease: SlotLease | None = None  # the engine slot this process holds while its engine lives
    saved_env: dict[str, str | None] = field(default_factory=dict)  # what the slot's env replaced
    private_locks: Path | None = None
    prefetch: Future | None = None
    loads: int = 0  # engines this process has loaded or attached to (a batch should need one)
    hosts: set[int] = field(default_factory=set)  # engine host pids this process attached to


_slot = _EngineSlot()


def held_slot() -> EngineSlot | None:
    """The engine slot this process holds (while its engine lives), if any."""
    return _slot.lease.slot if _slot.lease is not None and _slot.lease.held else None


def engines_loaded() -> int:
    """How many engines this process has loaded so far."""
    return _slot.loads


def discard_engine() -> None:
    """For a process about to exit: wait for a load in progress (its errors no longer matter), then shut
    the engine down, so no engine process outlives it and nothing prints after its last word."""
    if _slot.prefetch is not None:
        pending, _slot.prefetch = _slot.prefetch, None
        try:
            pending.result()
        except Exception:  # noqa: BLE001 (the run's own failure is what gets reported)
            pass
    release_engine()


def release_engine() -> None:
    """Shut the process's engine down, if one is loaded, and give its engine slot back."""
    _shutdown_engine()
    if _slot.lease is not None:
        lease, _slot.lease = _slot.lease, None
        lease.release()
    for name, value in _slot.saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _slot.saved_env.clear()


def adopt_slot(slot: EngineSlot, lock_fd: int) -> None:
    """In a worker process: the slot whose lock its parent passed down (as `lock_fd`) is this process's."""
    _slot.lease = SlotLease(slot, os.fdopen(lock_fd, "a+"))
    _apply_slot_env(slot)


def _shutdown_engine() -> None:
    if _slot.loaded is not None:
        engine, _slot.loaded = _slot.loaded, None
        engine.shutdown()
        if engine.record_dir is not None:
            engine_processes.forget_engine(engine.record_dir)


def _apply_slot_env(slot: EngineSlot) -> None:
    """Show the engine only its slot's devices. vLLM's engine core is a spawned child that reads these
    when it starts; this process itself never initialises CUDA (vLLM's front end queries NVML)."""
    for name, value in slot.env.items():
        _slot.saved_env.setdefault(name, os.environ.get(name))
        os.environ[name] = value
