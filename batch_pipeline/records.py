"""The records that cross a boundary: batch input lines, request bodies, output and error lines.

One pydantic model per record: the request bodies (validated by batch_pipeline/input_file.py) and the
error member of an output line (written by batch_pipeline/results.py). The shapes follow the
OpenAI Batch API: an input line is `{"custom_id", "method", "url", "body"}`; an output line is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
EMBEDDINGS_URL = "/v1/embeddings"
SUPPORTED_URLS = (CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL)

Number = int | float
# Fields that OpenAI clients commonly send and that do not change what a batch engine computes.
_IGNORED_FIELDS = {"user", "store", "metadata", "service_tier", "stream", "stream_options", "parallel_tool_calls"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] = 1
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    # vLLM's extensions to the OpenAI parameters, as its own server accepts them.
    top_k: StrictInt | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0)] | None = None
    ignore_eos: StrictBool | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("stream") is True:
                raise ValueError("stream=true is not supported in a batch")
            return {k: v for k, v in data.items() if k not in _IGNORED_FIELDS}
        return data

    @model_validator(mode="after")
    def _stop_is_short(self) -> _Body:
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop accepts at most 4 sequences")
        return self


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


BODY_MODELS: dict[str, type[BaseModel]] = {
    CHAT_URL: ChatCompletionBody,
    COMPLETIONS_URL: CompletionBody,
    EMBEDDINGS_URL: EmbeddingBody,
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
