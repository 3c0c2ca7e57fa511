"""Stopping a batch early: a cancel request, or a completion window that closed before it finished.

Never done while reading a batch's status. `request_cancel` records the request; `enforce_stop` acts
on it: it clears a queue ticket not yet launched, asks the run coordinator to cancel a run in flight,
and once no run is active writes the partial results (what finished, plus one error line for each
request that never ran) through batch_pipeline/domain/results.py. The `batch_stops` sensor and the API
server call `enforce_stops` on a timer, so a stop completes even when nobody reads the batch.
"""

from __future__ import annotations

import logging
import time

from dagster import DagsterInstance, DagsterRunStatus

from batch_pipeline.domain.batches import Submission, load_submission, save_submission, valid_batch_id
from batch_pipeline.domain.constants import BATCHES_PARTITIONS
from batch_pipeline.domain.queue_tickets import clear_ticket
from batch_pipeline.domain.results import write_stopped_results
from batch_pipeline.domain.status import BatchFacts, ChunkStats, EndedRuns, read_facts, read_many_facts, stop_reason
from resources.storage import BatchPaths, BatchStorage, Location

log = logging.getLogger(__name__)


def request_cancel(paths: BatchPaths, facts: BatchFacts, now: float) -> None:
    """Record a cancel request for the batch (enforce_stop then carries it out)."""
    submission = (facts.submission or Submission()).model_copy(update={"cancel_requested_at": now})
    save_submission(paths, submission)


def enforce_stop(instance: DagsterInstance, paths: BatchPaths, data_dir: Location, facts: BatchFacts,
                 now: float) -> bool:
    """Carry out a due stop, as far as it can go now; True if something was done."""
    reason = stop_reason(facts, now)
    if reason is None or facts.stopped is not None:
        return False
    submission = facts.submission
    if reason == "expired" and submission is not None and submission.expired_at is None:
        submission = submission.model_copy(update={"expired_at": now})
        save_submission(paths, submission)
    if facts.ticket_pending and submission is not None and submission.ticket:
        clear_ticket(data_dir, submission.ticket)
    run = facts.run
    if run is not None and run.active:
        if run.status != DagsterRunStatus.CANCELING:
            instance.run_coordinator.cancel_run(run.run_id)
        return True  # the partial results are written once the run has stopped
    write_stopped_results(paths, reason)
    if submission is not None:
        save_submission(paths, submission.model_copy(update={"stopped_at": time.time()}))
    return True


def _cancel_requested(paths: BatchPaths) -> bool:
    submission = load_submission(paths)
    return submission is not None and submission.cancel_requested_at is not None


def enforce_stops(instance: DagsterInstance, data_dir: Location, stats: ChunkStats | None = None,
                  ended: EndedRuns | None = None) -> list[str]:
    """Enforce every due stop on the instance; returns the ids of the batches acted on."""
    storage = BatchStorage(data_dir=str(data_dir))
    stats = stats or ChunkStats()
    now = time.time()
    unsettled = []
    for batch_id in instance.get_dynamic_partitions(BATCHES_PARTITIONS):
        if not valid_batch_id(batch_id):
            continue
        paths = storage.batch(batch_id)
        if not paths.spec.is_file() or paths.stopped.exists():
            continue  # not a batch, or already stopped
        if paths.summary.exists() and not _cancel_requested(paths):
            continue  # finished: only a cancel that raced the finish still needs settling
        unsettled.append(paths)
    try:  # every unsettled batch's facts at once: this runs every 10 s in the API server and the daemon
        facts: list[BatchFacts | None] = list(read_many_facts(instance, unsettled, data_dir, stats, ended))
    except Exception:  # a broken batch among them: read them one by one below, so only it is skipped
        facts = [None] * len(unsettled)
    acted = []
    for paths, read in zip(unsettled, facts, strict=True):
        try:
            if enforce_stop(instance, paths, data_dir, read or read_facts(instance, paths, data_dir, stats, ended),
                            now):
                acted.append(paths.root.name)
        except Exception:  # one broken batch must not stop the others from being enforced
            log.exception("could not enforce the stop of batch %s", paths.root.name)
    return acted
