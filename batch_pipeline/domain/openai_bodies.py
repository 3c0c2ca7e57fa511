"""Translate OpenAI request bodies into vLLM engine inputs, and vLLM outputs into OpenAI response bodies.

vLLM is imported lazily so that the CLI, the sensors and the webserver can import this package
without paying for the engine import.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batch_pipeline.domain.records import (
    CHAT_URL,
    EMBEDDINGS_URL,
    RESPONSES_URL,
    BatchError,
    ChatCompletionBody,
    CompletionBody,
    EmbeddingBody,
    ErrorCode,
    ResponseFormat,
    ResponsesBody,
)
from resources.engine_types import EngineRequest, admission_errors
from resources.engine_wire import SamplingSpec

if TYPE_CHECKING:
    from vllm import RequestOutput


class RequestRejected(Exception):
    """A request that cannot run; carries the error record's code and message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _structured_outputs(response_format: ResponseFormat | None) -> dict[str, Any] | None:
    """vLLM StructuredOutputsParams keyword arguments for an OpenAI response_format."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"json_object": True}
    assert response_format.json_schema is not None
    return {"json": response_format.json_schema.json_schema}


def _sampling(kwargs: dict[str, Any], structured: dict[str, Any] | None, remote: bool) -> Any:
    """The request's sampling parameters: vLLM's SamplingParams, checked now (RequestRejected), or for an
    engine host (`remote`) a SamplingSpec that the host builds and checks (no vLLM import here)."""
    spec = SamplingSpec(kwargs, structured)
    if remote:
        return spec
    try:
        return spec.build()
    except admission_errors() as exc:  # vLLM's own checks (top_k -5: a VLLMValidationError, no ValueError)
        raise RequestRejected(ErrorCode.INVALID_BODY, f"invalid sampling parameters: {exc}") from None


def _tokenize_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    try:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja errors from the model's own template
        raise RequestRejected(ErrorCode.INVALID_BODY, f"the model's chat template rejected the messages: {exc}") from None
    return list(tokenizer.encode(rendered, add_special_tokens=False))


def prepare_requests(
    keys: Iterator[int], url: str, body_json: str, tokenizer: Any, max_model_len: int, runner: str = "generate",
    remote: bool = False,
) -> list[EngineRequest]:
    """Turn a validated body into one EngineRequest per prompt (each keyed by next(keys)), or raise RequestRejected.

    `remote`: the requests go to an engine host, which builds (and checks) their sampling parameters.
    """
    if url == EMBEDDINGS_URL:
        raise RequestRejected(
            ErrorCode.UNSUPPORTED_ENDPOINT,
            "this batch runs a generative engine; put /v1/embeddings requests in a batch of their own",
        )
    if runner != "generate":
        raise RequestRejected(ErrorCode.UNSUPPORTED_ENDPOINT,
                              f"this batch runs an embedding (pooling) engine; {url} needs a generative one")
    if url == RESPONSES_URL:
        return [_prepare_response(next(keys), body_json, tokenizer, max_model_len, remote)]
    body: ChatCompletionBody | CompletionBody
    wants_logprobs = False
    top_logprobs = 0
    if url == CHAT_URL:
        body = ChatCompletionBody.model_validate_json(body_json)
        prompts = [_tokenize_chat(tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])]
        wants_logprobs = body.logprobs
        top_logprobs = body.top_logprobs or 0
        if body.top_logprobs and not body.logprobs:
            raise RequestRejected(ErrorCode.INVALID_BODY, "top_logprobs needs logprobs=true")
    else:
        body = CompletionBody.model_validate_json(body_json)
        prompts = [list(tokenizer.encode(prompt)) if isinstance(prompt, str) else list(prompt)
                   for prompt in body.prompt_values()]
        wants_logprobs = body.logprobs is not None
        top_logprobs = body.logprobs or 0
    limit = body.output_limit
    for index, prompt_ids in enumerate(prompts):
        _check_length(prompt_ids, limit, max_model_len, f"prompt {index}" if len(prompts) > 1 else "the prompt")
    requests = []
    for prompt_ids in prompts:
        params = _sampling({"n": body.n, **body.sampling_args(),
                            "max_tokens": limit if limit is not None else max_model_len - len(prompt_ids),
                            "logprobs": top_logprobs if wants_logprobs else None},
                           _structured_outputs(body.response_format), remote)
        requests.append(EngineRequest(next(keys), prompt_ids, params, url, wants_logprobs, top_logprobs))
    return requests


def _check_length(prompt_ids: list[int], limit: int | None, max_model_len: int, where: str) -> None:
    prompt_len = len(prompt_ids)
    if prompt_len == 0:
        raise RequestRejected(ErrorCode.INVALID_BODY, f"{where} is empty")
    if prompt_len >= max_model_len or (limit is not None and prompt_len + limit > max_model_len):
        requested = prompt_len + (limit or 0)
        raise RequestRejected(
            ErrorCode.CONTEXT_LENGTH,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{requested} tokens ({prompt_len} in {where}, {limit or 0} for the completion).",
        )


def _prepare_response(key: int, body_json: str, tokenizer: Any, max_model_len: int, remote: bool) -> EngineRequest:
    """A `/v1/responses` body as one engine request: its messages through the chat template, one output."""
    body = ResponsesBody.model_validate_json(body_json)
    prompt_ids = _tokenize_chat(tokenizer, body.messages())
    limit = body.max_output_tokens
    _check_length(prompt_ids, limit, max_model_len, "the input")
    text_format = body.text.format if body.text and body.text.format else None
    sampling = body.sampling_args()
    # What the response object repeats of the request, as OpenAI's does.
    echo = {"instructions": body.instructions, "max_output_tokens": limit, "temperature": sampling["temperature"],
            "top_p": sampling["top_p"],
            "text": {"format": (text_format.model_dump(exclude_none=True, by_alias=True) if text_format
                                else {"type": "text"}),
                     **({"verbosity": body.text.verbosity} if body.text and body.text.verbosity else {})}}
    params = _sampling({**sampling, "max_tokens": limit if limit is not None else max_model_len - len(prompt_ids)},
                       _structured_outputs(body.response_format()), remote)
    return EngineRequest(key, prompt_ids, params, RESPONSES_URL, False, 0, echo)


@dataclass(slots=True)
class EmbeddingRequest:
    """One `/v1/embeddings` request: each of its inputs as token ids."""

    key: int
    inputs: list[list[int]]
    encoding_format: str = "float"
    dimensions: int | None = None


def prepare_embedding(key: int, body_json: str, tokenizer: Any, max_model_len: int,
                      matryoshka: bool = False) -> EmbeddingRequest:
    """Tokenise an embeddings body and check every input's length, or raise RequestRejected.

    `dimensions` shortens the vector the way OpenAI's text-embedding-3 models do (keep the first N
    values, renormalise), which is only meaningful for a model trained for it (matryoshka).
    """
    body = EmbeddingBody.model_validate_json(body_json)
    if body.dimensions is not None and not matryoshka:
        raise RequestRejected(ErrorCode.INVALID_BODY, "dimensions needs a model trained for shortened embeddings "
                              "(matryoshka); this model has a fixed size: leave dimensions out")
    raw = body.input
    if isinstance(raw, str):
        items: list = [raw]
    elif raw and isinstance(raw[0], int):
        items = [raw]
    else:
        items = list(raw)
    inputs = [list(tokenizer.encode(item)) if isinstance(item, str) else list(item) for item in items]
    for index, ids in enumerate(inputs):
        if not ids:
            raise RequestRejected(ErrorCode.INVALID_BODY, f"input {index} is empty")
        if len(ids) > max_model_len:
            raise RequestRejected(ErrorCode.CONTEXT_LENGTH, f"This model's maximum context length is {max_model_len} "
                                  f"tokens. However, input {index} has {len(ids)} tokens.")
    return EmbeddingRequest(key, inputs, body.encoding_format, body.dimensions)


def _shape_vector(vector: list[float], request: EmbeddingRequest) -> list[float] | str:
    if request.dimensions is not None and request.dimensions < len(vector):
        vector = vector[:request.dimensions]
        norm = math.sqrt(sum(value * value for value in vector)) or 1.0
        vector = [value / norm for value in vector]
    if request.encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def embedding_body(request: EmbeddingRequest, vectors: list[list[float]], model_name: str) -> dict[str, Any]:
    """The OpenAI embeddings response (`object: list`) for one request."""
    tokens = sum(len(ids) for ids in request.inputs)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _shape_vector(vector, request)}
                 for i, vector in enumerate(vectors)],
        "model": model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def _chat_logprobs(choice: Any, top: int) -> dict[str, Any] | None:
    if choice.logprobs is None:
        return None
    content = []
    for token_id, position in zip(choice.token_ids, choice.logprobs, strict=False):
        sampled = position.get(token_id)
        ranked = sorted(position.values(), key=lambda lp: lp.rank if lp.rank is not None else 1 << 30)[:top]
        token = (sampled.decoded_token if sampled else None) or ""
        content.append({
            "token": token,
            "logprob": max(sampled.logprob, -9999.0) if sampled else -9999.0,
            "bytes": _token_bytes(token),
            "top_logprobs": [
                {"token": lp.decoded_token or "", "logprob": max(lp.logprob, -9999.0),
                 "bytes": _token_bytes(lp.decoded_token or "")}
                for lp in ranked
            ],
        })
    return {"content": content, "refusal": None}


def _completion_logprobs(choice: Any, top: int) -> dict[str, Any] | None:
    if choice.logprobs is None:
        return None
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = 0
    for token_id, position in zip(choice.token_ids, choice.logprobs, strict=False):
        sampled = position.get(token_id)
        token = (sampled.decoded_token if sampled else None) or ""
        tokens.append(token)
        token_logprobs.append(max(sampled.logprob, -9999.0) if sampled else None)
        ranked = sorted(position.values(), key=lambda lp: lp.rank if lp.rank is not None else 1 << 30)[:top]
        top_logprobs.append({lp.decoded_token or "": max(lp.logprob, -9999.0) for lp in ranked} if top else None)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _finish_reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _response_object(request: EngineRequest, output: RequestOutput, model_name: str, created: int,
                     cached_tokens: int) -> dict[str, Any]:
    """The Responses API `response` object: one assistant message with one output_text part."""
    choice = output.outputs[0]
    input_tokens, output_tokens = len(request.prompt_token_ids), len(choice.token_ids)
    # A length stop is the output limit (max_output_tokens, or the context left when none was given).
    incomplete = choice.finish_reason == "length"
    return {
        "id": f"resp_{uuid.uuid4().hex}",
        "object": "response",
        "created_at": created,
        "status": "incomplete" if incomplete else "completed",
        "completed_at": None if incomplete else created,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "model": model_name,
        "output": [{
            "id": f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "status": "incomplete" if incomplete else "completed",
            "content": [{"type": "output_text", "text": choice.text, "annotations": [], "logprobs": []}],
        }],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "tool_choice": "auto",
        "tools": [],
        "truncation": "disabled",
        "metadata": {},
        "user": None,
        **(request.echo or {}),
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }


def response_body(request: EngineRequest, output: RequestOutput, model_name: str) -> dict[str, Any]:
    """The OpenAI `chat.completion`, `text_completion` or `response` object for a finished request."""
    created = int(time.time())
    choices = sorted(output.outputs, key=lambda c: c.index)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    prompt_tokens = len(request.prompt_token_ids)
    # Prompt tokens found in vLLM's prefix cache, reported where OpenAI reports its own cache hits.
    cached_tokens = min(int(getattr(output, "num_cached_tokens", None) or 0), prompt_tokens)
    if request.url == RESPONSES_URL:
        return _response_object(request, output, model_name, created, cached_tokens)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens,
             "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if request.url == CHAT_URL:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": _chat_logprobs(c, request.top_logprobs) if request.wants_logprobs else None,
                    "finish_reason": _finish_reason(c.finish_reason),
                }
                for c in choices
            ],
            "usage": usage,
        }
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": created,
        "model": model_name,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": _completion_logprobs(c, request.top_logprobs) if request.wants_logprobs else None,
                "finish_reason": _finish_reason(c.finish_reason),
            }
            for c in choices
        ],
        "usage": usage,
    }


def merge_completion_bodies(bodies: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """One `text_completion` for several prompts: prompt i's choices get indices i*n .. i*n+n-1, as OpenAI numbers them."""
    merged = dict(bodies[0])
    merged["choices"] = [dict(choice, index=prompt * n + choice["index"])
                         for prompt, body in enumerate(bodies) for choice in body["choices"]]
    usage: dict[str, Any] = {key: sum(body["usage"][key] for body in bodies)
                             for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
    usage["prompt_tokens_details"] = {
        "cached_tokens": sum(body["usage"]["prompt_tokens_details"]["cached_tokens"] for body in bodies)}
    merged["usage"] = usage
    return merged


def error_json(error: BatchError) -> str:
    """An error member as compact JSON."""
    return json.dumps(error.model_dump(exclude_none=True), separators=(",", ":"))
