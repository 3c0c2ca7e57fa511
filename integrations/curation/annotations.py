"""Reviewers' annotations turned into data: rows for annotations.parquet, training lines, quality scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from integrations.curation.label_config import ACCEPT, ANSWER, DECISION, PAIRWISE, RATING, REJECT
from integrations.curation.records import AnnotationRecord, Message, TrainingExample, WinRate
from integrations.curation.selection import COMPLETION_ROLE


def _iso(value: Any) -> str | None:
    return value.isoformat() if hasattr(value, "isoformat") else (str(value) if value is not None else None)


def _get(annotation: Any, name: str) -> Any:
    return annotation.get(name) if isinstance(annotation, dict) else getattr(annotation, name, None)


def annotation_record(task: Any, annotation: Any) -> AnnotationRecord:
    """One annotation of a review task as a row: decision, rating and the (possibly corrected) answer."""
    decision = rating = answer = None
    for item in _get(annotation, "result") or []:
        value = item.get("value") or {}
        if item.get("from_name") == DECISION and value.get("choices"):
            decision = value["choices"][0]
        elif item.get("from_name") == RATING and value.get("rating") is not None:
            rating = int(value["rating"])
        elif item.get("from_name") == ANSWER and value.get("text") is not None:
            text = value["text"]
            answer = "\n".join(text) if isinstance(text, list) else str(text)
    model_answer = task.data.get("response", "")
    corrected = answer is not None and answer.strip() != "" and answer.strip() != model_answer.strip()
    completed_by = _get(annotation, "completed_by")
    return AnnotationRecord(
        batch_id=task.data["batch_id"], custom_id=task.data["custom_id"], task_id=task.id,
        annotation_id=_get(annotation, "id"), annotator=completed_by if isinstance(completed_by, int) else None,
        decision=decision, rating=rating, model_answer=model_answer, answer=answer, corrected=corrected,
        was_cancelled=bool(_get(annotation, "was_cancelled")), created_at=_iso(_get(annotation, "created_at")),
        updated_at=_iso(_get(annotation, "updated_at")))


def final_annotation(records: list[AnnotationRecord]) -> AnnotationRecord | None:
    """The annotation that decides a task: the most recently updated one that was not skipped."""
    kept = [r for r in records if not r.was_cancelled]
    return max(kept, key=lambda r: (r.updated_at or "", r.annotation_id)) if kept else None


def training_example(task: Any, final: AnnotationRecord) -> TrainingExample | None:
    """The fine-tuning line for a reviewed task: the corrected answer, else the accepted model answer.

    A rejected answer without a correction, and an annotation that neither accepts nor corrects, give none.
    """
    if final.corrected:
        answer = final.answer
    elif final.decision == ACCEPT:
        answer = final.model_answer
    else:
        return None
    messages = [Message(role="user" if m["role"] == COMPLETION_ROLE else m["role"], content=m["content"])
                for m in task.data["messages"]]
    return TrainingExample(messages=[*messages, Message(role="assistant", content=answer or "")])


@dataclass
class Quality:
    """Quality scores of a batch's reviews, counted over each task's final annotation."""

    annotated: int = 0
    accepted: int = 0
    rejected: int = 0
    corrected: int = 0
    training_examples: int = 0
    ratings: list[int] = field(default_factory=list)

    def add(self, final: AnnotationRecord, example: TrainingExample | None) -> None:
        self.annotated += 1
        self.accepted += final.decision == ACCEPT
        self.rejected += final.decision == REJECT
        self.corrected += final.corrected
        self.training_examples += example is not None
        if final.rating is not None:
            self.ratings.append(final.rating)

    def rate(self, count: int) -> float | None:
        return round(count / self.annotated, 4) if self.annotated else None

    @property
    def mean_rating(self) -> float | None:
        return round(sum(self.ratings) / len(self.ratings), 4) if self.ratings else None


def pairwise_choice(annotation: Any) -> str | None:
    """`left` or `right` from a Pairwise annotation; None when it holds no choice."""
    for item in _get(annotation, "result") or []:
        if item.get("from_name") == PAIRWISE or item.get("type") == "pairwise":
            selected = (item.get("value") or {}).get("selected")
            if selected in ("left", "right"):
                return selected
    return None


def win_rates(tasks: Any) -> list[WinRate]:
    """Win rates per batch pair from annotated pairwise tasks (each task's final, non-skipped choice)."""
    tallies: dict[str, dict[str, Any]] = {}
    for task in tasks:
        annotations = [a for a in (task.annotations or []) if not _get(a, "was_cancelled")]
        choices = [(_iso(_get(a, "updated_at")) or "", _get(a, "id"), pairwise_choice(a)) for a in annotations]
        choices = [c for c in choices if c[2] is not None]
        if not choices:
            continue
        selected = max(choices)[2]
        data = task.data
        batch_a, batch_b = data["pair"].split("|", 1)
        tally = tallies.setdefault(data["pair"], {"batch_a": batch_a, "batch_b": batch_b, "wins": {batch_a: 0, batch_b: 0},
                                                 "models": {}})
        tally["models"][data["batch_left"]] = data["model_left"]
        tally["models"][data["batch_right"]] = data["model_right"]
        tally["wins"][data["batch_left"] if selected == "left" else data["batch_right"]] += 1
    rates = []
    for pair, tally in sorted(tallies.items()):
        a, b = tally["batch_a"], tally["batch_b"]
        wins_a, wins_b = tally["wins"][a], tally["wins"][b]
        compared = wins_a + wins_b
        rates.append(WinRate(pair=pair, batch_a=a, batch_b=b, model_a=tally["models"].get(a, ""),
                             model_b=tally["models"].get(b, ""), wins_a=wins_a, wins_b=wins_b, compared=compared,
                             win_rate_a=round(wins_a / compared, 4) if compared else None))
    return rates
