"""Pairwise comparison: the same custom_ids answered by two batches, shown side by side in random order."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from integrations.curation.records import PairwiseTaskData, ReviewTaskData
from integrations.curation.selection import Selection, iter_reviewable, sample_key
from resources.storage import BatchPaths


def pair_key(batch_a: str, batch_b: str) -> str:
    """`<a>|<b>` with the two batch ids sorted: the same comparison whichever batch asks for it."""
    first, second = sorted((batch_a, batch_b))
    return f"{first}|{second}"


def _left_is_first(pair: str, custom_id: str) -> bool:
    # Position bias is real: which answer is on the left is a coin flip, fixed per (pair, custom_id).
    return hashlib.sha256(f"{pair}:{custom_id}".encode()).digest()[0] & 1 == 0


def pairwise_tasks(this: tuple[BatchPaths, str, str], other: tuple[BatchPaths, str, str],
                   selection: Selection) -> Iterator[PairwiseTaskData]:
    """A pairwise task for every custom_id both batches answered (and the selection picks), in this batch's order.

    Memory holds the other batch's answers for the chosen custom_ids only: pairwise review is meant for
    samples, so set a sample size or fraction for large batches.
    """
    this_paths, this_id, this_model = this
    other_paths, other_id, other_model = other
    pair = pair_key(this_id, other_id)
    other_ids = {task.custom_id for task in iter_reviewable(other_paths, other_id, other_model)}
    shared = [task.custom_id for task in iter_reviewable(this_paths, this_id, this_model)
              if task.custom_id in other_ids and selection._eligible(task)]
    del other_ids
    if selection.sample_size is not None and len(shared) > selection.sample_size:
        shared = sorted(shared, key=lambda cid: sample_key(selection.seed, cid))[:selection.sample_size]
    chosen = set(shared)
    answers: dict[str, ReviewTaskData] = {t.custom_id: t for t in iter_reviewable(other_paths, other_id, other_model)
                                          if t.custom_id in chosen}
    for task in iter_reviewable(this_paths, this_id, this_model):
        if task.custom_id not in chosen:
            continue
        theirs = answers.pop(task.custom_id)
        first, second = (task, theirs) if task.batch_id == pair.split("|")[0] else (theirs, task)
        left, right = (first, second) if _left_is_first(pair, task.custom_id) else (second, first)
        yield PairwiseTaskData(pair=pair, custom_id=task.custom_id, batch_left=left.batch_id, batch_right=right.batch_id,
                               model_left=left.model, model_right=right.model, messages=task.messages,
                               answer_left=left.response, answer_right=right.response)
