"""Where curation keeps its files for a batch: `DATA_DIR/batches/<id>/curation/`."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from resources.storage import BatchPaths


class CurationPaths:
    """The curation files of one batch."""

    def __init__(self, batch: BatchPaths):
        self.batch = batch
        self.root: Path = cast(Path, batch.root) / "curation"  # a local data folder (see enabled_integrations)

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def annotations(self) -> Path:
        return self.root / "annotations.parquet"

    @property
    def training(self) -> Path:
        return self.root / "training.jsonl"
