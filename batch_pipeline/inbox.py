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

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from batch_pipeline.batches import BatchSpec, file_digest, register_batch
from batch_pipeline.models import ModelRegistry, UnknownModelError
from batch_pipeline.settings import Settings
from resources.storage import BatchStorage

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
    """The file cannot become a batch; the message says why, in one line."""


def _models_in(path: Path, max_line_bytes: int) -> tuple[set[str], int]:
    """The `body.model` values of the file's JSON-object lines, and how many such lines there are."""
    models: set[str] = set()
    objects = lines = 0
    with path.open("rb") as handle:
        while raw := handle.readline(max_line_bytes + 1):
            if not raw.strip():
                continue
            lines += 1
            try:
                obj = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                continue  # a bad line is the pipeline's business: it becomes an error record
            if not isinstance(obj, dict):
                continue
            objects += 1
            body = obj.get("body")
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                models.add(body["model"])
    if lines == 0:
        raise FileRejected("the file is empty: it has no request lines")
    if objects == 0:
        raise FileRejected("the file is not JSONL: no line is a JSON object (one request per line)")
    return models, objects


def choose_model(path: Path, settings: Settings, registry: ModelRegistry) -> tuple[str, str, dict]:
    """(what the engine loads, the served name, engine args) for a file, or FileRejected."""
    models, _ = _models_in(path, settings.max_line_bytes)
    if len(models) > 1:
        raise FileRejected(f"the file mixes models ({', '.join(sorted(models))}); "
                           "a batch runs one model: split it into one file per model")
    name = next(iter(models), None) or settings.model
    if not name:
        raise FileRejected("no model: set body.model on the requests or VBATCH_MODEL")
    try:
        served = registry.resolve(name)
    except UnknownModelError as exc:
        raise FileRejected(str(exc)) from None
    return served.model, name, served.engine_args


def _batch_id(path: Path, model: str, digest: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", path.stem).strip("-")[:48] or "batch"
    return f"{stem}-{hashlib.sha256(f'{digest}:{model}'.encode()).hexdigest()[:10]}"


def take(file: InboxFile, settings: Settings, instance) -> Intake:
    """Register the batch for a complete inbox file (idempotent); the file itself is moved later by `settle`."""
    inbox = settings.resolved_inbox_dir
    digest = file_digest(file.path)
    rejected = None
    try:
        model, name, engine_args = choose_model(file.path, settings, ModelRegistry.from_settings(settings))
    except FileRejected as exc:
        model, name, engine_args, rejected = "", "", {}, str(exc)
    batch_id = _batch_id(file.path, model, digest)
    destination = inbox / (REJECTED if rejected else PROCESSED) / f"{batch_id}.jsonl"
    spec = BatchSpec(batch_id=batch_id, input_path=str(destination), model=model, model_name=name,
                     engine_args=engine_args, chunk_size=settings.chunk_size, source="inbox",
                     metadata={"inbox_file": file.path.name}, rejected=rejected)
    # The batch reads its input from the destination; link it there now, so the run can start
    # before the file leaves the inbox (the link is the same file, no copy).
    destination.parent.mkdir(parents=True, exist_ok=True)
    if not destination.exists():
        try:
            os.link(file.path, destination)
        except OSError:
            import shutil

            shutil.copyfile(file.path, destination)
    if rejected:
        destination.with_suffix(".reason.txt").write_text(rejected + "\n")
    register_batch(instance, BatchStorage(data_dir=str(settings.resolved_data_dir)).batch(batch_id), spec)
    return Intake(spec, file.path, destination)


def settle(source: Path) -> None:
    """Remove a taken file from the inbox (its content lives on under processed/ or rejected/)."""
    source.unlink(missing_ok=True)
