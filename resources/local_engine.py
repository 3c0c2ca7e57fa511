"""An engine in this process: `vllm.LLM`, fed by the admission loop through an in-process transport."""

from __future__ import annotations

import gc
import itertools
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resources.engine_loop import EngineGone, Streaming
from resources.engine_types import EngineFailure, EngineLoadError, EngineRequest, admission_errors

if TYPE_CHECKING:
    from vllm import LLM

log = logging.getLogger(__name__)

CPU_SHUTDOWN_GRACE_SECONDS = 1.0


class InProcessTransport:
    """The admission loop's transport to a `vllm.LLM` of this process: direct calls, no copies."""

    def __init__(self, engine: Any, window: int):
        self.engine = engine  # vLLM's LLMEngine
        self._window = window

    def exchange(self, adds: list[tuple[str, EngineRequest]]) -> tuple[list[Any], list[tuple[str, EngineFailure]]]:
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        failures = []
        try:
            for request_id, request in adds:
                try:
                    # Outputs carry the id given here (add_request returns an internal variant).
                    self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=request.prompt_token_ids),
                                            request.params)
                except admission_errors() as exc:  # vLLM's checks of this request's prompt and params
                    failures.append((request_id, EngineFailure(str(exc))))
            outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
        except EngineDeadError as exc:
            raise EngineGone(str(exc) or type(exc).__name__) from exc
        return [output for output in outputs if output.finished], failures

    def window(self) -> int:
        return self._window

    def abort(self, request_ids: list[str]) -> None:
        self.engine.abort_request(request_ids)


class LoadedEngine(Streaming):
    """A loaded `vllm.LLM` plus what the pipeline needs to know about it."""

    remote = False  # requests carry vLLM's own SamplingParams

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
        self.record_dir: Path | None = None
        self.dead = False
        self._ids = itertools.count()
        self._transport = InProcessTransport(llm.llm_engine, max(2 * self.max_num_seqs, 512))
        self._watching = watch_core_death(llm)

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Embedding vectors for token-id inputs (a pooling engine), in input order."""
        from vllm.inputs import TokensPrompt

        outputs = self.llm.embed([TokensPrompt(prompt_token_ids=ids) for ids in inputs], use_tqdm=False)
        return [list(map(float, output.outputs.embedding)) for output in outputs]

    def shutdown(self) -> None:
        """Stop the engine core processes and free the model's memory."""
        self._watching.set()
        try:
            # vLLM waits 5 s for its engine core to exit before killing it. On the CPU build the core never
            # makes it (its worker's own interpreter teardown outlasts the grace), so every batch waited the
            # whole 5 s for a kill; the outputs are all in by now, so a second is enough.
            self.llm.llm_engine.engine_core.shutdown(timeout=CPU_SHUTDOWN_GRACE_SECONDS if _on_cpu() else None)
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


def build_llm(kwargs: dict[str, Any]) -> LLM:
    """`vllm.LLM` for `kwargs` (platform defaults filled in); EngineLoadError with the first line of why not."""
    try:
        from vllm import LLM

        return LLM(**resolve_platform_defaults(kwargs))
    except Exception as exc:
        raise EngineLoadError(f"could not load model {kwargs['model']!r}: {load_failure_reason(exc)}") from exc


def load_failure_reason(exc: BaseException) -> str:
    """Why an engine did not load, in one line (vLLM's errors can run to pages)."""
    from pydantic import ValidationError

    text = str(exc).strip()
    if isinstance(exc, ValidationError) and exc.errors():
        # The first line would say only "1 validation error for ModelConfig"; the reason is the error's message.
        text = str(exc.errors(include_url=False)[0]["msg"]).removeprefix("Value error, ").strip()
    return text.splitlines()[0] if text else type(exc).__name__
