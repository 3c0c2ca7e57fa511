"""The contract of a result handler: given a finished batch, deliver its files and say what was delivered."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

from dagster import ConfigurableResource

from batch_pipeline.domain.batches import BatchRecordError, load_spec, load_summary
from batch_pipeline.domain.settings import Settings
from resources.storage import BatchPaths

# The files a handler delivers, by the name they keep at the destination. Handlers read them from a
# local data folder (an object-store data root is refused when handlers are enabled).
RESULT_FILES: dict[str, Callable[[BatchPaths], Path]] = {
    "output.jsonl": lambda paths: cast(Path, paths.output),
    "errors.jsonl": lambda paths: cast(Path, paths.errors),
    "results.parquet": lambda paths: cast(Path, paths.results_parquet),
    "summary.json": lambda paths: cast(Path, paths.summary),
}


class DeliveryRefused(Exception):
    """The destination refused in a way a retry will not fix (no such bucket, access denied): fail at once."""


@dataclass(frozen=True)
class FinishedBatch:
    """What a handler gets: the batch's id, model, counts, metadata and the paths of its result files."""

    batch_id: str
    model: str
    counts: dict[str, int]
    metadata: dict[str, str]
    files: dict[str, Path]

    @classmethod
    def from_paths(cls, paths: BatchPaths) -> FinishedBatch:
        """Read a batch that batch_results has merged; BatchRecordError if its summary.json is missing or damaged."""
        summary = load_summary(paths)
        if summary is None:
            raise BatchRecordError(f"batch {paths.root.name} has no merged results (summary.json) to deliver")
        spec = load_spec(paths)
        # The counts delivered before cached_tokens existed, so an unchanged batch's manifest keeps its bytes.
        counts = summary.model_dump(include={"total", "completed", "failed", "prompt_tokens", "completion_tokens"})
        files = {name: path_of(paths) for name, path_of in RESULT_FILES.items() if path_of(paths).is_file()}
        return cls(batch_id=spec.batch_id, model=summary.model, counts=counts, metadata=dict(spec.metadata),
                   files=files)

    def manifest(self, checksums: dict[str, str]) -> bytes:
        """A deterministic manifest.json (no timestamps), so an unchanged batch gives identical bytes."""
        body = {"batch_id": self.batch_id, "model": self.model, "counts": self.counts, "metadata": self.metadata,
                "files": {name: {"bytes": self.files[name].stat().st_size, "sha256": checksums[name]}
                          for name in sorted(self.files)}}
        return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class Delivered:
    """One thing a handler delivered: where it went, its size and checksum, and whether bytes moved this time."""

    name: str
    uri: str
    bytes: int
    sha256: str
    transferred: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_of(path: Path) -> str:
    """sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class ResultHandler(ConfigurableResource):
    """Delivers a finished batch somewhere. Subclass it, implement `deliver`, and name it in VBATCH_RESULT_HANDLERS.

    A handler must be idempotent (its asset is retried and re-materialised) and must only read the batch's
    files: a failing handler never changes the batch's results. Packages a handler needs are imported inside
    its methods, and named in `requires` with the pip `extra` that brings them, so a missing one is one line.
    """

    # The handler's short name: its asset is `deliver_<name>`.
    handler_name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ResultHandler:
        """The handler configured from the settings object (the default takes no configuration)."""
        return cls()

    @classmethod
    def short_name(cls) -> str:
        """`handler_name`, or the class name without 'Handler', lower-case (S3Handler -> s3)."""
        return cls.handler_name or cls.__name__.removesuffix("Handler").lower() or cls.__name__.lower()

    def deliver(self, batch: FinishedBatch, log: Any) -> list[Delivered]:
        """Deliver the batch; return what was delivered. Any exception is retried; DeliveryRefused is not."""
        raise NotImplementedError


class ObjectStoreHandler(ResultHandler):
    """A bucket of objects: every result file under PREFIX/BATCH_ID/, plus manifest.json, skipped when unchanged.

    The sha256 of each file is kept in the object's metadata; a re-run compares it and uploads nothing that is
    already there with the same content.
    """

    bucket: str
    prefix: str = ""

    def key(self, batch_id: str, name: str) -> str:
        """The object key of one file of a batch."""
        return "/".join(part for part in (self.prefix.strip("/"), batch_id, name) if part)

    def uri(self, key: str) -> str:
        raise NotImplementedError

    def remote_sha256(self, key: str) -> str | None:
        """The sha256 recorded on the object, or None when there is no object (or no checksum)."""
        raise NotImplementedError

    def upload_file(self, key: str, path: Path, sha256: str) -> None:
        raise NotImplementedError

    def upload_bytes(self, key: str, data: bytes, sha256: str) -> None:
        raise NotImplementedError

    def deliver(self, batch: FinishedBatch, log: Any) -> list[Delivered]:
        delivered = []
        checksums = {}
        for name, path in sorted(batch.files.items()):
            checksums[name] = checksum = sha256_of(path)
            key = self.key(batch.batch_id, name)
            changed = self.remote_sha256(key) != checksum
            if changed:
                log.info(f"uploading {name} ({path.stat().st_size} bytes) to {self.uri(key)}")
                self.upload_file(key, path, checksum)
            delivered.append(Delivered(name, self.uri(key), path.stat().st_size, checksum, changed))
        manifest = batch.manifest(checksums)
        checksum = hashlib.sha256(manifest).hexdigest()
        key = self.key(batch.batch_id, "manifest.json")
        changed = self.remote_sha256(key) != checksum
        if changed:
            self.upload_bytes(key, manifest, checksum)
        delivered.append(Delivered("manifest.json", self.uri(key), len(manifest), checksum, changed))
        return delivered
