"""The inbox folder: a `*.jsonl` file dropped there becomes a batch, exactly once.

The convention (docs/OPERATIONS.md):
- Write the file under another name (`.name.jsonl`, `name.jsonl.part`, anything not ending in
  `.jsonl`, or in another folder) and rename it to `name.jsonl` when it is complete. A file written in
  place is also safe: it is only taken once its size and mtime were the same on two sensor ticks.
- The model is the files' `body.model` (every line must name the same one), else VBATCH_MODEL.
- A taken file is moved to `processed/<batch id>.jsonl`; a refused one to `rejected/<batch id>.jsonl`
  with `<batch id>.reason.txt` beside it, and its batch's run fails with the same reason.

Exactly once: the batch id is derived from the file name, its content and the model, and the run
key is `inbox:<batch id>`; Dagster never launches two runs for one run key of a sensor, so a daemon
that dies between launching and moving the file launches nothing new when it comes back.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dagster import DagsterInstance

from batch_pipeline.domain.batches import BatchSpec, default_batch_id
from batch_pipeline.domain.intake import IntakeError, register, resolve_model, survey
from batch_pipeline.domain.models import ServedModel
from batch_pipeline.domain.settings import Settings

PROCESSED = "processed"
REJECTED = "rejected"


@dataclass(frozen=True)
class InboxFile:
    """A file in the inbox, with what the size check needs."""

    path: Path
    size: int
    mtime_ns: int

    @property
    def signature(self) -> list[int]:
        return [self.size, self.mtime_ns]


@dataclass(frozen=True)
class Intake:
    """What the inbox made of one file: a registered batch, rejected or not."""

    spec: BatchSpec
    source: Path
    destination: Path

    @property
    def run_key(self) -> str:
        return run_key(self.spec.batch_id)


def run_key(batch_id: str) -> str:
    """The run key of the inbox run for a batch."""
    return f"inbox:{batch_id}"


def list_inbox(inbox: Path) -> list[InboxFile]:
    """The candidate files: `*.jsonl` directly in the inbox, not hidden, oldest first."""
    if not inbox.is_dir():
        return []
    found = []
    for entry in os.scandir(inbox):
        if entry.name.startswith(".") or not entry.name.endswith(".jsonl") or not entry.is_file():
            continue
        stat = entry.stat()
        found.append(InboxFile(Path(entry.path), stat.st_size, stat.st_mtime_ns))
    return sorted(found, key=lambda f: (f.mtime_ns, f.path.name))


class FileRejected(Exception):
    """The file cannot become a batch; the message says why, in one line, and `code` in one word."""

    def __init__(self, message: str, code: str = "invalid_file"):
        super().__init__(message)
        self.code = code


def choose_model(path: Path, settings: Settings) -> ServedModel:
    """The model a file runs (every line must name the same one, else the default), or FileRejected."""
    found = survey(path, settings.max_line_bytes)
    if found.lines == 0:
        raise FileRejected("the file is empty: it has no request lines", "empty_file")
    if found.objects == 0:
        raise FileRejected("the file is not JSONL: no line is a JSON object (one request per line)")
    if len(found.models) > 1:
        raise FileRejected(f"the file mixes models ({', '.join(sorted(found.models))}); "
                           "a batch runs one model: split it into one file per model", "model_mismatch")
    name = next(iter(found.models), None) or settings.model
    if not name:
        raise FileRejected("no model: set body.model on the requests or VBATCH_MODEL", "model_not_found")
    try:
        return resolve_model(settings, name)
    except IntakeError as exc:
        raise FileRejected(str(exc), exc.code or "invalid_file") from None


def take(file: InboxFile, settings: Settings, instance: DagsterInstance) -> Intake:
    """Register the batch for a complete inbox file (idempotent); the file itself is moved later by `settle`."""
    rejected = rejected_code = None
    try:
        served = choose_model(file.path, settings)
    except FileRejected as exc:
        served, rejected, rejected_code = ServedModel(name="", model=""), str(exc), exc.code
    batch_id = default_batch_id(file.path, served.model)
    destination = settings.resolved_inbox_dir / (REJECTED if rejected else PROCESSED) / f"{batch_id}.jsonl"
    # The batch reads its input from the destination; link it there now, so the run can start
    # before the file leaves the inbox (the link is the same file, no copy).
    destination.parent.mkdir(parents=True, exist_ok=True)
    if not destination.exists():
        try:
            os.link(file.path, destination)
        except OSError:
            shutil.copyfile(file.path, destination)
    if rejected:
        destination.with_suffix(".reason.txt").write_text(rejected + "\n")
    spec = register(settings, instance, destination, served, source="inbox", batch_id=batch_id,
                    metadata={"inbox_file": file.path.name}, rejected=rejected,
                    rejected_code=rejected_code)
    return Intake(spec, file.path, destination)


def settle(source: Path) -> None:
    """Remove a taken file from the inbox (its content lives on under processed/ or rejected/)."""
    _test_fault_before_settle()
    source.unlink(missing_ok=True)


# A fault hook for tests only (tests/test_inbox_crash.py), never set in production: when this variable
# names a file that does not exist yet, the first settle creates it and then waits, so the test can
# SIGKILL the daemon after the run was launched and before the file left the inbox. Later settles (the
# restarted daemon's) see the file and go on.
_FAULT_BEFORE_SETTLE = "VBATCH_TEST_FAULT_BEFORE_SETTLE"


def _test_fault_before_settle() -> None:
    marker = os.environ.get(_FAULT_BEFORE_SETTLE)
    if not marker:
        return
    try:
        with open(marker, "x") as handle:
            handle.write(str(os.getpid()))
    except FileExistsError:
        return
    time.sleep(600)
