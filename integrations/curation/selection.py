"""Which of a batch's requests go to review, and how each is shown: read in pages, sampled by a seeded hash.

The results and the requests are read side by side, one parquet row group at a time (both are in the
batch's request order), so a 50,000-request batch never sits in memory. A sample is chosen by hashing
`seed:custom_id`, so the same settings always pick the same requests: re-materialising finds the tasks
it imported before instead of drawing a new sample.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from batch_pipeline.domain.records import EMBEDDINGS_URL, RESPONSES_URL, ResponsesBody
from integrations.curation.records import Message, ReviewTaskData
from resources.storage import BatchPaths

_READ_ROWS = 2048
COMPLETION_ROLE = "prompt"  # a completion prompt is shown as one turn with this role


@dataclass(frozen=True)
class Selection:
    """Which successful requests of a batch are reviewed (all of them unless something is set)."""

    sample_size: int | None = None
    sample_fraction: float | None = None
    seed: int = 0
    only_schema_failures: bool = False
    custom_ids: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Any) -> Selection:
        """The selection configured by the VBATCH_CURATION_* settings."""
        return cls(settings.curation_sample_size, settings.curation_sample_fraction, settings.curation_sample_seed,
                   settings.curation_only_schema_failures, frozenset(settings.curation_custom_ids))

    def describe(self) -> str:
        """One line for logs and metadata."""
        parts = []
        if self.custom_ids:
            parts.append(f"{len(self.custom_ids)} custom_ids")
        if self.only_schema_failures:
            parts.append("JSON schema failures only")
        if self.sample_fraction is not None:
            parts.append(f"fraction {self.sample_fraction:g} (seed {self.seed})")
        if self.sample_size is not None:
            parts.append(f"at most {self.sample_size} (seed {self.seed})")
        return ", ".join(parts) or "every successful request"

    def _eligible(self, task: ReviewTaskData) -> bool:
        if self.custom_ids and task.custom_id not in self.custom_ids:
            return False
        if self.only_schema_failures and task.schema_failed is not True:
            return False
        return self.sample_fraction is None or sample_key(self.seed, task.custom_id) < self.sample_fraction * 2**64


def sample_key(seed: int, custom_id: str) -> int:
    """A request's place in the seeded sample order: a 64-bit hash of `seed:custom_id`."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{custom_id}".encode()).digest()[:8], "big")


def render_content(content: Any) -> str:
    """A chat message's content as text: parts joined, non-text parts named in brackets."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                pieces.append(str(part.get("text", "")))
            else:
                pieces.append(f"[{part.get('type', 'part') if isinstance(part, dict) else 'part'}]")
        return "\n".join(pieces)
    return json.dumps(content)


def as_chat_body(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """A request body in chat's terms: a `/v1/responses` body's `instructions` and `input` as the messages the
    engine prompted the model with, its `text.format` as `response_format`; other bodies as they are."""
    if url != RESPONSES_URL:
        return body
    request = ResponsesBody.model_validate(body)
    response_format = request.response_format()
    return {"messages": request.messages(),
            "response_format": response_format.model_dump(mode="json", by_alias=True) if response_format else None}


def prompt_messages(url: str, body: dict[str, Any]) -> list[Message]:
    """The prompt as a reviewer reads it: chat messages by role, or the completion prompt as one turn."""
    if "messages" in body:
        return [Message(role=str(m.get("role", "user")), content=render_content(m.get("content"))
                        or (json.dumps(m["tool_calls"]) if m.get("tool_calls") else ""))
                for m in body["messages"]]
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    return [Message(role=COMPLETION_ROLE, content=prompt if isinstance(prompt, str) else json.dumps(prompt))]


def response_text(response_body: dict[str, Any]) -> str:
    """The answer of a response body: the first choice's message content (chat) or text (completion), or a
    `response` object's `output_text` parts (joined, as the official client's `output_text` joins them)."""
    if response_body.get("object") == "response":
        return "".join(part.get("text") or "" for item in response_body.get("output") or []
                       if item.get("type") == "message"
                       for part in item.get("content") or [] if part.get("type") == "output_text")
    choices = response_body.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "message" in choice:
        message = choice["message"] or {}
        if message.get("content") is not None:
            return message["content"]
        return json.dumps(message.get("tool_calls") or "")
    return choice.get("text") or ""


def schema_failed(body: dict[str, Any], answer: str) -> bool | None:
    """Whether the answer breaks the request's JSON response format; None when it asked for none."""
    response_format = body.get("response_format") or {}
    kind = response_format.get("type")
    if kind not in ("json_schema", "json_object"):
        return None
    try:
        value = json.loads(answer)
    except ValueError:
        return True
    if kind == "json_object":
        return not isinstance(value, dict)
    schema = (response_format.get("json_schema") or {}).get("schema")
    if not schema:
        return False
    import jsonschema

    return next(iter(jsonschema.Draft202012Validator(schema).iter_errors(value)), None) is not None


def iter_reviewable(paths: BatchPaths, batch_id: str, model: str) -> Iterator[ReviewTaskData]:
    """Every successful generation of the batch as review task data, in request order."""
    requests = pq.ParquetFile(paths.requests).iter_batches(batch_size=_READ_ROWS, columns=["line", "url", "body"])
    results = pq.ParquetFile(paths.results_parquet).iter_batches(
        batch_size=_READ_ROWS, columns=["line", "custom_id", "response", "error"])
    request_rows = (row for record_batch in requests for row in record_batch.to_pylist())
    for record_batch in results:
        for result in record_batch.to_pylist():
            request = next(request_rows)
            if request["line"] != result["line"]:
                raise RuntimeError(f"results.parquet and requests.parquet disagree at line {result['line']}; "
                                   "re-materialise batch_results")
            if result["error"] is not None or request["url"] == EMBEDDINGS_URL:
                continue
            body = as_chat_body(request["url"], json.loads(request["body"]))
            answer = response_text(json.loads(result["response"])["body"])
            yield ReviewTaskData(batch_id=batch_id, custom_id=result["custom_id"], model=model, line=result["line"],
                                 url=request["url"], messages=prompt_messages(request["url"], body), response=answer,
                                 schema_failed=schema_failed(body, answer))


def select_for_review(paths: BatchPaths, batch_id: str, model: str, selection: Selection) -> Iterator[ReviewTaskData]:
    """The reviewable requests the selection picks, in request order (two passes when sampling N)."""
    if selection.sample_size is None:
        yield from (task for task in iter_reviewable(paths, batch_id, model) if selection._eligible(task))
        return
    # The N smallest hash keys among the eligible requests: a heap of N (negated keys), never the whole batch.
    heap: list[tuple[int, str]] = []
    for task in iter_reviewable(paths, batch_id, model):
        if not selection._eligible(task):
            continue
        item = (-sample_key(selection.seed, task.custom_id), task.custom_id)
        if len(heap) < selection.sample_size:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    chosen = {custom_id for _, custom_id in heap}
    yield from (task for task in iter_reviewable(paths, batch_id, model) if task.custom_id in chosen)
