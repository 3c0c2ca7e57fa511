"""The OpenAI Batch object: a batch's status, timestamps, request counts and token usage.

Defined once for the whole project: the status derivation (batch_pipeline/domain/status.py) builds it, the
API serves it, the CLI prints it, and the tests validate it against the official `openai.types.Batch`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]
TERMINAL_STATUSES = frozenset({"failed", "completed", "expired", "cancelled"})

_WINDOW_RE = re.compile(r"^([1-9][0-9]{0,5})(s|m|h)$")
_WINDOW_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
MAX_WINDOW_SECONDS = 7 * 24 * 3600


def window_seconds(window: str) -> int:
    """'24h' -> 86400; raises ValueError for anything else than N followed by s, m or h (up to 7 days)."""
    match = _WINDOW_RE.match(window)
    if not match:
        raise ValueError("completion_window must be a duration such as '24h', '90m' or '30s'")
    seconds = int(match.group(1)) * _WINDOW_UNIT_SECONDS[match.group(2)]
    if seconds > MAX_WINDOW_SECONDS:
        raise ValueError("completion_window may be at most 168h")
    return seconds


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class BatchErrorItem(BaseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorItem] = Field(default_factory=list)


class CompletionEstimate(BaseModel):
    """When the batch is expected to finish (an extension beyond OpenAI: batch_pipeline/domain/estimate.py)."""

    expected_completed_at: int | None = Field(default=None, description="Unix seconds; null with a reason.")
    at_submit: int | None = Field(default=None, description="expected_completed_at as estimated at creation.")
    estimated_at: int | None = None
    reason: str | None = Field(default=None, description="Why there is no estimate.")
    tokens_per_second: float | None = Field(default=None, description="The model's measured generation rate.")
    expected_output_tokens: int | None = None
    queued_ahead: int = Field(default=0, description="Unfinished batches created before this one.")


class Batch(BaseModel):
    """The Batch object; status and counts are derived from the instance and the batch's files."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    usage: Usage = Field(default_factory=Usage)
    metadata: dict[str, str] | None = None
    # Extension (not in OpenAI's object): requests of `request_counts.completed` answered from the response
    # cache instead of the engine (docs/API.md).
    requests_from_cache: int = 0
    completion_estimate: CompletionEstimate | None = None  # extension: when it is expected to finish
