"""Queue tickets: a registered batch leaves a ticket that the `queued_batches` sensor turns into a run.

The API and `vllm-batch submit` queue batches this way, so a batch is launched exactly once however
often it is read or retried: the sensor uses the ticket id as the run key, and Dagster never launches
two runs for one run key. (The inbox sensor launches its runs itself, with run key `inbox:<batch id>`.)
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from batch_pipeline.domain.batches import BatchSpec
from resources.storage import Location, atomic_path, list_names


def queue_dir(data_dir: Location) -> Location:
    """Where tickets wait for the sensor."""
    return data_dir / "queue"


def enqueue(data_dir: Location, spec: BatchSpec, tags: dict[str, str] | None = None) -> str:
    """Leave a ticket for `spec` (already registered); returns the ticket id, which is the run key."""
    ticket = f"{spec.batch_id}.{uuid.uuid4().hex[:12]}"
    with atomic_path(queue_dir(data_dir) / f"{ticket}.json") as tmp:
        tmp.write_text(json.dumps({"ticket": ticket, "batch_id": spec.batch_id, "tags": tags or {}}))
    return ticket


def pending_tickets(data_dir: Location) -> list[dict]:
    """Tickets not yet cleared, oldest first."""
    folder = queue_dir(data_dir)
    if isinstance(folder, Path):
        if not folder.is_dir():
            return []
        entries = sorted((e for e in os.scandir(folder) if e.name.endswith(".json")), key=lambda e: e.stat().st_mtime)
        paths: list[Location] = [Path(entry.path) for entry in entries]
    else:  # an object store: the queue is shared by every host of the deployment
        paths = []
        for name in list_names(folder):
            if name.endswith(".json"):
                try:
                    paths.append(folder / name)
                    paths[-1].stat()
                except FileNotFoundError:
                    paths.pop()
        paths.sort(key=lambda path: path.stat().st_mtime)
    tickets = []
    for path in paths:
        try:
            tickets.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # a ticket being written right now, or cleared meanwhile; the next tick sees it
    return tickets


def ticket_exists(data_dir: Location, ticket: str) -> bool:
    """True while the ticket waits for the sensor."""
    return (queue_dir(data_dir) / f"{ticket}.json").exists()


def clear_ticket(data_dir: Location, ticket: str) -> None:
    """Remove a ticket once its run exists."""
    (queue_dir(data_dir) / f"{ticket}.json").unlink(missing_ok=True)


def set_aside(data_dir: Location, ticket: str, reason: str) -> None:
    """Move a ticket that cannot be launched to `queue/set-aside/`, with the reason, out of the sensor's way."""
    source = queue_dir(data_dir) / f"{ticket}.json"
    target = queue_dir(data_dir) / "set-aside" / f"{ticket}.json"
    if not isinstance(source, Path):  # an object store: copy, then delete
        target.with_suffix(".reason.txt").write_text(reason + "\n")
        try:
            source.fs.mv(source.path, f"{source.parent.path}/set-aside/{ticket}.json")
        except FileNotFoundError:
            pass  # cleared meanwhile
        return
    assert isinstance(target, Path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.with_suffix(".reason.txt").write_text(reason + "\n")
    try:
        os.replace(source, target)
    except FileNotFoundError:
        pass  # cleared meanwhile
