"""Where a batch's files live, and how they are written so that a crash never leaves half a file."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster import ConfigurableResource

_CHUNK_RE = re.compile(r"^chunk-(\d{6})\.parquet$")


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is fsynced and renamed onto `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


class BatchPaths:
    """The files of one batch under `DATA_DIR/batches/<batch_id>/`."""

    def __init__(self, root: Path):
        self.root = root

    @property
    def spec(self) -> Path:
        return self.root / "batch.json"

    @property
    def submission(self) -> Path:
        return self.root / "submission.json"

    @property
    def requests(self) -> Path:
        return self.root / "input" / "requests.parquet"

    @property
    def invalid(self) -> Path:
        return self.root / "input" / "invalid.jsonl"

    @property
    def manifest(self) -> Path:
        return self.root / "input" / "manifest.json"

    @property
    def chunks_dir(self) -> Path:
        return self.root / "chunks"

    def chunk(self, index: int) -> Path:
        return self.chunks_dir / f"chunk-{index:06d}.parquet"

    def finished_chunks(self) -> set[int]:
        """Indexes of the chunks already written (each write is atomic, so present means complete)."""
        if not self.chunks_dir.is_dir():
            return set()
        found = set()
        for entry in os.scandir(self.chunks_dir):
            match = _CHUNK_RE.match(entry.name)
            if match:
                found.add(int(match.group(1)))
        return found

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def output(self) -> Path:
        return self.results_dir / "output.jsonl"

    @property
    def errors(self) -> Path:
        return self.results_dir / "errors.jsonl"

    @property
    def results_parquet(self) -> Path:
        return self.results_dir / "results.parquet"

    @property
    def summary(self) -> Path:
        return self.results_dir / "summary.json"

    @property
    def stopped(self) -> Path:
        """The counts of a batch stopped early (cancelled or expired), beside its partial results."""
        return self.results_dir / "stopped.json"


class BatchStorage(ConfigurableResource):
    """The data folder that holds every batch's input, chunks and results."""

    data_dir: str

    def batch(self, batch_id: str) -> BatchPaths:
        """The paths of one batch (the id is a validated partition key)."""
        return BatchPaths(Path(self.data_dir) / "batches" / batch_id)
