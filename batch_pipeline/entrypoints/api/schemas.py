"""The bodies of the Batch API, shaped like OpenAI's: File, Batch, Model, lists and errors.

The tests validate these against the official client's types (`openai.types.Batch`, `FileObject`).
"""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from batch_pipeline.domain.batch_object import (  # noqa: F401  (re-exported: the API's bodies in one place)
    TERMINAL_STATUSES,
    Batch,
    BatchErrorItem,
    BatchErrors,
    RequestCounts,
    Usage,
    window_seconds,
)

FilePurpose = Literal["batch", "batch_output"]

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error response: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


# OpenAI's bounds for `expires_after` (files) and `output_expires_after` (a batch's output and error files).
MIN_EXPIRES_SECONDS = 3600
MAX_EXPIRES_SECONDS = 30 * 24 * 3600


class ExpiresAfter(BaseModel):
    """An expiration policy, `{"anchor": "created_at", "seconds": N}`; checked by `expires_seconds`, so
    that a wrong value answers OpenAI's 400, not a 422."""

    anchor: str
    seconds: int


def expires_seconds(policy: ExpiresAfter | None, param: str) -> int | None:
    """The seconds of a valid policy (None for none); ValueError naming the field otherwise."""
    if policy is None:
        return None
    if policy.anchor != "created_at":
        raise ValueError(f"{param}.anchor: only 'created_at' is supported, got {policy.anchor!r}")
    if not MIN_EXPIRES_SECONDS <= policy.seconds <= MAX_EXPIRES_SECONDS:
        raise ValueError(f"{param}.seconds: must be between {MIN_EXPIRES_SECONDS} (1 hour) and "
                         f"{MAX_EXPIRES_SECONDS} (30 days), got {policy.seconds}")
    return policy.seconds


class CreateBatchRequest(BaseModel):
    """The body of `POST /v1/batches`."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=128)
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
    completion_window: str = Field(default="24h", description="N followed by s, m or h; OpenAI only accepts '24h'.")
    metadata: dict[str, str] | None = Field(default=None, description="Up to 16 pairs; keys <= 64, values <= 512.")
    output_expires_after: ExpiresAfter | None = Field(
        default=None, description="When the output and error files expire: anchor 'created_at' (the file's "
        "creation), seconds 3600..2592000.")

    @field_validator("completion_window")
    @classmethod
    def _window_is_a_duration(cls, value: str) -> str:
        window_seconds(value)
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_is_small(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError("metadata may hold at most 16 pairs")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys are at most 64 characters and values at most 512")
        return value


Item = TypeVar("Item")


class ListPage(BaseModel, Generic[Item]):
    """A page of a list: OpenAI's cursor shape (`after` is the last id of the previous page)."""

    object: Literal["list"] = "list"
    data: list[Item]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vllm-batch"
