"""The records that cross a boundary: batch input lines, request bodies, output and error lines.

One pydantic model per record: the request bodies (validated by batch_pipeline/domain/input_file.py) and the
error member of an output line (written by batch_pipeline/domain/results.py). The shapes follow the
OpenAI Batch API: an input line is `{"custom_id", "method", "url", "body"}`; an output line is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator
from pydantic_core import PydanticCustomError

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
EMBEDDINGS_URL = "/v1/embeddings"
RESPONSES_URL = "/v1/responses"
SUPPORTED_URLS = (CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL, RESPONSES_URL)

Number = int | float
# Fields that OpenAI clients commonly send and that do not change what a batch engine computes.
_IGNORED_FIELDS = {"user", "store", "metadata", "service_tier", "stream", "stream_options", "parallel_tool_calls"}


def _at_most_four(stop: str | list[str] | None) -> str | list[str] | None:
    if isinstance(stop, list) and len(stop) > 4:
        raise PydanticCustomError(  # OpenAI's own words for it
            "array_above_max_length",
            "array too long. Expected an array with maximum length 4, but got an array with length {length} instead.",
            {"length": len(stop)})
    return stop


class GenerativeBody(BaseModel):
    """The sampling fields every generative body shares (chat, completions, responses), each bounded once.

    OpenAI's ranges, and vLLM's extensions as its own server takes them (its /v1/responses has all of them
    but min_tokens, which is accepted here too). An endpoint adds its own fields (input, output limit,
    format) in its model below.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    seed: StrictInt | None = None
    # One check outside the union, so that a fifth sequence is the error, not "stop.str: not a string".
    stop: Annotated[str | list[str] | None, AfterValidator(_at_most_four)] = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    # vLLM's extensions to the OpenAI parameters, as its own server accepts them.
    top_k: StrictInt | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0)] | None = None
    ignore_eos: StrictBool | None = None
    # This project's extension: false keeps the request out of the response cache (neither answered from
    # it nor stored in it; batch_pipeline/domain/response_reuse.py).
    response_cache: StrictBool | None = None

    def sampling_args(self) -> dict[str, Any]:
        """These fields as vLLM `SamplingParams` arguments, OpenAI's defaults where a field is not set."""
        return {
            "temperature": 1.0 if self.temperature is None else float(self.temperature),
            "top_p": 1.0 if self.top_p is None else float(self.top_p),
            "seed": self.seed,
            "stop": self.stop,
            "presence_penalty": float(self.presence_penalty or 0.0),
            "frequency_penalty": float(self.frequency_penalty or 0.0),
            "top_k": self.top_k or 0,
            "min_tokens": self.min_tokens or 0,
            "repetition_penalty": float(self.repetition_penalty or 1.0),
            "ignore_eos": bool(self.ignore_eos),
        }


class _Body(GenerativeBody):
    """What chat and completions bodies add: `n`, `max_tokens`, and the client defaults they drop."""

    n: Annotated[StrictInt, Field(ge=1, le=128)] = 1
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("stream") is True:
                raise ValueError("stream=true is not supported in a batch")
            return {k: v for k, v in data.items() if k not in _IGNORED_FIELDS}
        return data


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JSONSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "response"
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is 'json_schema'")
        return self


class ChatCompletionBody(_Body):
    """The body of a `/v1/chat/completions` request."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None

    @property
    def output_limit(self) -> int | None:
        """max_completion_tokens, or the older max_tokens."""
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(_Body):
    """The body of a `/v1/completions` request."""

    # Every form OpenAI accepts: a string, a list of strings, token ids, a list of token-id lists.
    prompt: (str | Annotated[list[StrictInt], Field(min_length=1)] | Annotated[list[str], Field(min_length=1)]
             | Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]], Field(min_length=1)])
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None

    @property
    def output_limit(self) -> int | None:
        """max_tokens (OpenAI's default for completions is 16)."""
        return self.max_tokens if self.max_tokens is not None else 16

    def prompt_values(self) -> list[str | list[int]]:
        """Each prompt, as text or token ids, in the order OpenAI numbers their choices."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [cast("str | list[int]", self.prompt)]
        return list(cast("list[str] | list[list[int]]", self.prompt))


class EmbeddingBody(BaseModel):
    """The body of a `/v1/embeddings` request."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[StrictInt], Field(min_length=1)]
    # "base64" is the official Python client's default: little-endian float32 bytes, base64-encoded.
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: str | None = None


class ResponseInputText(BaseModel):
    """A text content part of a Responses API input message (`output_text` when a reply is sent back)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["input_text", "output_text"]
    text: str


class ResponseInputMessage(BaseModel):
    """A message item of a Responses API `input` (`{"role", "content"}`, `type: "message"` optional)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ResponseInputText]
    # Items copied from an earlier response's output carry these; they change nothing here.
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        """The message content as one string (text parts joined)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseTextFormat(BaseModel):
    """`text.format` of a Responses request: plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseTextFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("text.format.schema is required when type is 'json_schema'")
        return self

    def as_response_format(self) -> ResponseFormat:
        """The same constraint in chat's `response_format` shape, which becomes vLLM structured outputs."""
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        spec = JSONSchemaSpec(name=self.name or "response", schema=self.json_schema or {}, strict=self.strict)
        return ResponseFormat(type="json_schema", json_schema=spec)


class ResponseTextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: ResponseTextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


# Responses API features a batch engine does not offer, with why; a line that uses one gets this error.
_RESPONSES_UNSUPPORTED = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "max_tool_calls": "tool calling is not supported",
    "previous_response_id": "responses are not stored; send the whole conversation in input",
    "conversation": "responses are not stored; send the whole conversation in input",
    "prompt": "stored prompt templates are not supported; put the text in input",
    "reasoning": "reasoning options are not supported",
    "stream": "stream=true is not supported in a batch",
    "background": "background mode is not supported in a batch",
    "include": "extra output (include) is not supported",
    "top_logprobs": "logprobs are not supported for /v1/responses; use /v1/chat/completions",
    "truncation": "truncation='auto' is not supported; an over-long input fails with context_length_exceeded",
}
# Values of those fields that ask for nothing unsupported.
_RESPONSES_HARMLESS = {"tool_choice": ("auto", "none"), "truncation": ("disabled",)}
_RESPONSES_IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls", "safety_identifier",
                      "prompt_cache_key", "prompt_cache_retention", "stream_options"}


def _check_input_items(items: list) -> None:
    # Checked here so that an unsupported item gets one clear message, not the union's every mismatch.
    if not items:
        raise ValueError("input is an empty list; give a string or at least one message")
    for index, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else type(item).__name__
        if kind != "message":
            raise ValueError(f"input item {index} has type {kind!r}; only message items "
                             "({\"role\", \"content\"}) are supported")
        content = item.get("content")
        for part in content if isinstance(content, list) else []:
            part_kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if part_kind not in ("input_text", "output_text"):
                raise ValueError(f"input item {index} has a content part of type {part_kind!r}; only text "
                                 "parts (input_text, output_text) are supported")


def _asks_for_nothing(value: Any) -> bool:
    if value is None or value is False or value == 0 or value == [] or value == {}:
        return True
    return isinstance(value, dict) and all(item is None for item in value.values())


class ResponsesBody(GenerativeBody):
    """The body of a `/v1/responses` request (text in, one text message out)."""

    input: str | Annotated[list[ResponseInputMessage], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    text: ResponseTextConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _supported_features_only(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, why in _RESPONSES_UNSUPPORTED.items():
            value = data.get(name)
            if value in _RESPONSES_HARMLESS.get(name, ()) or _asks_for_nothing(value):
                continue
            raise ValueError(f"{name} is not supported in a batch /v1/responses request: {why}")
        if isinstance(data.get("input"), list):
            _check_input_items(data["input"])
        return {k: v for k, v in data.items() if k not in _RESPONSES_IGNORED and k not in _RESPONSES_UNSUPPORTED}

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages: `instructions` first, as a system message."""
        turns = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        if isinstance(self.input, str):
            return [*turns, {"role": "user", "content": self.input}]
        return turns + [{"role": item.role, "content": item.text()} for item in self.input]

    def response_format(self) -> ResponseFormat | None:
        """text.format as chat's response_format (None for plain text)."""
        return self.text.format.as_response_format() if self.text and self.text.format else None


BODY_MODELS: dict[str, type[BaseModel]] = {
    CHAT_URL: ChatCompletionBody,
    COMPLETIONS_URL: CompletionBody,
    EMBEDDINGS_URL: EmbeddingBody,
    RESPONSES_URL: ResponsesBody,
}


class BatchError(BaseModel):
    """The `error` member of an output line: a machine-readable code and a human message."""

    code: str
    message: str
    line: int | None = Field(default=None, description="1-based line number in the input file")


class ErrorCode:
    """The error codes written to errors.jsonl, in one place."""

    INVALID_JSON = "invalid_json"
    INVALID_UTF8 = "invalid_utf8"
    LINE_TOO_LONG = "line_too_long"
    NOT_AN_OBJECT = "invalid_request"
    MISSING_CUSTOM_ID = "missing_custom_id"
    DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
    INVALID_METHOD = "invalid_method"
    INVALID_URL = "invalid_url"
    INVALID_BODY = "invalid_body"
    MODEL_MISMATCH = "model_mismatch"
    CONTEXT_LENGTH = "context_length_exceeded"
    UNSUPPORTED_ENDPOINT = "unsupported_endpoint"
    ENGINE_ERROR = "engine_error"
