"""What crosses the engine host's socket: plain data, so that run workers never import vLLM.

A run worker attached to a warm host imports neither vLLM nor torch (about 25 s per run on an H100
host, where twenty small batches paid it twenty times): it sends sampling parameters as a
SamplingSpec, the host builds vLLM's SamplingParams, and outputs come back as PlainOutput.

The conversation (client -> host, each answered by one reply):
- ("step", [(request_id, prompt_token_ids, SamplingSpec), ...]) -> ("ok", outputs, failures, window)
  or ("dead", reason): admit the requests, wait for the next engine step, return the client's
  finished outputs, the admissions vLLM refused, and how many requests the client may keep in flight;
- ("abort", [request_id, ...]) -> ("ok",);  ("embed", [token_ids, ...]) -> ("ok", vectors);
- ("shutdown",) -> ("ok",), then the host exits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm import SamplingParams

HOST_RECORD = "host.json"  # the running host: pid, start time, socket, engine kwargs (in its state folder)
FAILED = "engine host failed: "  # the line a host that cannot start writes last in its log


def same_kwargs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two engine configurations are the same engine (a host's record against a batch's)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


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
