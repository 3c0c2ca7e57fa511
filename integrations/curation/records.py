"""The records curation writes and reads: Label Studio task data, annotation rows, training lines, status."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, Field


class Message(BaseModel):
    """One turn of a prompt as Label Studio's Paragraphs tag shows it (and as fine-tuning reads it)."""

    role: str
    content: str


class ReviewTaskData(BaseModel):
    """The `data` of a review task: one successful request of a batch."""

    kind: Literal["review"] = "review"
    batch_id: str
    custom_id: str
    model: str
    line: int
    url: str
    messages: list[Message]
    response: str
    schema_failed: bool | None = Field(default=None, description="Whether the answer failed its JSON schema.")


class PairwiseTaskData(BaseModel):
    """The `data` of a pairwise task: one custom_id answered by two batches, left/right randomised."""

    kind: Literal["pairwise"] = "pairwise"
    pair: str = Field(description="`<batch_a>|<batch_b>` (sorted): the comparison this task belongs to.")
    custom_id: str
    batch_left: str
    batch_right: str
    model_left: str
    model_right: str
    messages: list[Message]
    answer_left: str
    answer_right: str


class TrainingExample(BaseModel):
    """One line of training.jsonl: OpenAI's chat fine-tuning format."""

    messages: list[Message]


class AnnotationRecord(BaseModel):
    """One row of annotations.parquet: one reviewer's annotation of one review task."""

    batch_id: str
    custom_id: str
    task_id: int
    annotation_id: int
    annotator: int | None
    decision: str | None
    rating: int | None
    model_answer: str
    answer: str | None = Field(description="The answer text the reviewer submitted (pre-filled with the model's).")
    corrected: bool
    was_cancelled: bool
    created_at: str | None
    updated_at: str | None


ANNOTATIONS_SCHEMA = pa.schema([
    ("batch_id", pa.string()), ("custom_id", pa.string()), ("task_id", pa.int64()), ("annotation_id", pa.int64()),
    ("annotator", pa.int64()), ("decision", pa.string()), ("rating", pa.int64()), ("model_answer", pa.string()),
    ("answer", pa.string()), ("corrected", pa.bool_()), ("was_cancelled", pa.bool_()),
    ("created_at", pa.string()), ("updated_at", pa.string()),
])


class WinRate(BaseModel):
    """The pairwise result of two batches: how often each one's answer was picked."""

    pair: str
    batch_a: str
    batch_b: str
    model_a: str
    model_b: str
    wins_a: int
    wins_b: int
    compared: int
    win_rate_a: float | None


class CurationStatus(BaseModel):
    """What `GET /v1/batches/{id}/curation` and `vllm-batch curation status` show; written by the assets."""

    batch_id: str
    project_id: int | None = None
    project_url: str | None = None
    tasks_selected: int = 0
    tasks_imported: int = 0
    tasks_annotated: int = 0
    accepted: int = 0
    rejected: int = 0
    corrected: int = 0
    accept_rate: float | None = None
    mean_rating: float | None = None
    correction_rate: float | None = None
    training_examples: int = 0
    win_rates: list[WinRate] = Field(default_factory=list)
    tasks_updated_at: float | None = None
    annotations_updated_at: float | None = None
