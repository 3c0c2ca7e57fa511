"""The fast first pass over a request line: one msgspec decode that accepts the common, well-formed line.

The pydantic bodies in batch_pipeline/domain/records.py stay the contract: they give every verdict that this
pass does not give and every error message. This pass only says "valid, and here is the body" or "not
sure": a line it does not accept (any defect, or a legal but unusual form such as a string where a
number is expected, `null` for `n`, extra fields on a message, an endpoint without a struct here) goes
through the pydantic path, exactly as before. So it may be stricter than the contract, never looser;
tests/test_fast_lines.py checks that on every line of the fuzz corpus and on a seeded set of variations.

Why it exists: validating a chat body through the pydantic models costs ~8 us a line, this ~1 us, and
a 1,000,000-line batch is validated before its engine runs (docs/BENCHMARKS.md).

Each struct mirrors one model of records.py, with the same names, bounds and defaults; fields that may
be `null` there default to None here, and `omit_defaults` leaves them out of the stored body, as the
pydantic path's `exclude_none` does.
"""

from __future__ import annotations

import operator
from functools import reduce
from typing import Annotated, Any, Literal

import msgspec

from batch_pipeline.domain.records import CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL

# A line nested deeper than this (arrays and objects, the line itself is level 1) is rejected: the
# stored body is parsed again downstream by pydantic, whose JSON parser stops at 200 levels.
MAX_NESTING = 64


def _number(bounds: msgspec.Meta) -> Any:
    """A number (JSON int or float, never bool) within bounds, as the pydantic `Number` fields take it."""
    return Annotated[int, bounds] | Annotated[float, bounds]


def nesting_depth(value: object, limit: int) -> int:
    """How deep `value` nests lists and dicts (a scalar is 0, `[]` is 1), counting no further than limit + 1."""
    depth, level = 0, [value]
    while depth <= limit:
        containers = [item for item in level if type(item) is dict or type(item) is list]
        if not containers:
            return depth
        depth += 1
        level = [child for item in containers for child in (item.values() if type(item) is dict else item)]
    return depth


# The fields the pydantic bodies accept and drop (records._IGNORED_FIELDS; a test keeps this a subset,
# so this pass never drops what pydantic keeps), as fields of _Body below.
DROPPED_FIELDS = ("user", "store", "metadata", "service_tier", "stream", "stream_options", "parallel_tool_calls")


class _Struct(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


class TextContentPart(_Struct):
    type: Literal["text"]
    text: str


class ChatMessage(_Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None


class JSONSchemaSpec(_Struct):
    name: str = "response"
    json_schema: dict[str, Any] = msgspec.field(default_factory=dict, name="schema")
    strict: bool | None = None

    def __post_init__(self) -> None:
        # Level 5 of the line: line, body, response_format, json_schema, schema.
        if nesting_depth(self.json_schema, MAX_NESTING) > MAX_NESTING - 4:
            raise ValueError("nested too deeply")


class ResponseFormat(_Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None

    def __post_init__(self) -> None:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema missing")


_PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
_Scalar = str | int | float | bool | None


class _GenerativeBody(_Struct):
    # records.GenerativeBody, field for field (tests/test_fast_lines.py compares the names).
    model: str | None = None
    temperature: _number(msgspec.Meta(ge=0, le=2)) | None = None  # type: ignore[valid-type]
    top_p: _number(msgspec.Meta(gt=0, le=1)) | None = None  # type: ignore[valid-type]
    seed: int | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=4)] | None = None
    presence_penalty: _number(msgspec.Meta(ge=-2, le=2)) | None = None  # type: ignore[valid-type]
    frequency_penalty: _number(msgspec.Meta(ge=-2, le=2)) | None = None  # type: ignore[valid-type]
    top_k: int | None = None
    min_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    repetition_penalty: _number(msgspec.Meta(gt=0)) | None = None  # type: ignore[valid-type]
    ignore_eos: bool | None = None
    response_cache: bool | None = None


class _Body(_GenerativeBody):
    n: Annotated[int, msgspec.Meta(ge=1, le=128)] = 1
    max_tokens: _PositiveInt | None = None
    # DROPPED_FIELDS, in their usual (flat) shapes; other shapes take the pydantic path.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, _Scalar] | None = None
    service_tier: str | None = None
    stream: bool | None = None
    stream_options: dict[str, _Scalar] | None = None
    parallel_tool_calls: bool | None = None

    def __post_init__(self) -> None:
        if (self.user is None and self.store is None and self.metadata is None and self.service_tier is None
                and self.stream is None and self.stream_options is None and self.parallel_tool_calls is None):
            return  # the usual body: nothing to drop
        if self.stream is True:
            raise ValueError("stream")
        for name in DROPPED_FIELDS:
            setattr(self, name, None)


class ChatCompletionBody(_Body, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: _PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None


def _one_form(values: list[str | int | list[int]]) -> bool:
    """A non-empty list of only strings, only token ids, or only non-empty token-id lists."""
    if not values:
        return False
    kind = type(values[0])
    if any(type(value) is not kind for value in values):
        return False
    return kind is not list or all(values)


class CompletionBody(_Body, kw_only=True):
    prompt: str | list[str | int | list[int]]
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None

    def __post_init__(self) -> None:
        _Body.__post_init__(self)
        if not isinstance(self.prompt, str) and not _one_form(self.prompt):
            raise ValueError("prompt")


class EmbeddingBody(_Struct, kw_only=True):
    model: str | None = None
    input: str | list[str | int]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: _PositiveInt | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.input, str) and not _one_form(self.input):  # type: ignore[arg-type]
            raise ValueError("input")


# The endpoints with a fast path; an endpoint in records.BODY_MODELS that is missing here is still
# accepted, through the pydantic path. Adding one is a struct above and one entry here.
FAST_BODIES: dict[str, type[_Struct]] = {
    CHAT_URL: ChatCompletionBody,
    COMPLETIONS_URL: CompletionBody,
    EMBEDDINGS_URL: EmbeddingBody,
}


def _line_struct(url: str, body: type[_Struct]) -> type[msgspec.Struct]:
    return msgspec.defstruct(f"Line{body.__name__}", [("custom_id", str), ("method", Literal["POST"]), ("body", body)],
                             tag_field="url", tag=url, forbid_unknown_fields=True)


_DECODER = msgspec.json.Decoder(reduce(operator.or_, (_line_struct(url, body) for url, body in FAST_BODIES.items())))
_URLS = {body: url for url, body in FAST_BODIES.items()}
_ENCODER = msgspec.json.Encoder()


def decode_line(raw: bytes) -> tuple[str, str, str, str | None] | None:
    """(custom_id, url, body as compact JSON, body.model) if this pass accepts the line, else None
    (then the pydantic path decides). The body leaves out nulls and the fields records.py ignores."""
    try:
        line: Any = _DECODER.decode(raw)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):  # ValidationError is a DecodeError
        return None
    body = line.body
    return line.custom_id, _URLS[type(body)], _ENCODER.encode(body).decode(), body.model
