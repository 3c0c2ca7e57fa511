"""What every engine speaks, in-process or hosted: a request in, a finished output or a refusal out.

No vLLM import here: run workers attached to an engine host use these types without loading vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class EngineLoadError(Exception):
    """The model could not be loaded; the message says which model and why, in one line."""


@dataclass(slots=True)
class EngineRequest:
    """One request ready for the engine: token ids and sampling parameters.

    `params` is vLLM's SamplingParams for an in-process engine, a SamplingSpec for an engine host.
    """

    key: int
    prompt_token_ids: list[int]
    params: Any
    url: str
    wants_logprobs: bool
    top_logprobs: int
    # Request fields the response object repeats (the Responses API echoes its parameters); never sent to vLLM.
    echo: dict[str, Any] | None = None


@dataclass(slots=True)
class EngineFailure:
    """A request the engine refused at admission (e.g. vLLM's own parameter checks).

    `code`: the line's error code when it is not `engine_error` (invalid sampling parameters that an
    engine host found, since its clients build no `SamplingParams` of their own).
    """

    message: str
    code: str | None = None


class EngineDied(Exception):
    """The engine's core process died mid-stream; `in_flight` are the requests it had not finished."""

    def __init__(self, in_flight: list[EngineRequest], reason: str):
        super().__init__(f"the engine died with {len(in_flight)} requests in flight: {reason}")
        self.in_flight = in_flight


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
