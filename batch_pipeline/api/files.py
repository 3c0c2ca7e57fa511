"""The file store behind `/v1/files`: uploaded batch inputs, and batch results exposed as files.

Every file is a folder `DATA_DIR/files/<file_id>/` holding `file.json` (the record) and, for uploads,
`content`. A batch's output and error files are not copied: their record points at the results
folder, and their ids are derived from the batch id, so they can be registered again at any time.
File ids are opaque (`file-` and hex digits) and are checked before they touch a path.

Every record carries its owner (batch_pipeline/tenancy.py: the fingerprint of the key that uploaded
it, or that created the batch a results file belongs to; None for no tenant). Reading a record another
tenant owns is FileNotFound, as for an id that does not exist.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from batch_pipeline.api.schemas import Batch, FileObject
from batch_pipeline.tenancy import OPERATOR, Tenant
from resources.storage import BatchPaths, Location, atomic_path

_FILE_ID_RE = re.compile(r"^file-[0-9a-f]{24,64}$")


class FileNotFound(Exception):
    """No file has this id (or the id is not a file id at all)."""


class StoredFile(BaseModel):
    """file.json: the public record plus where the bytes are."""

    file: FileObject
    path: str
    batch_id: str | None = None
    owner: str | None = None  # the tenant's key fingerprint (never the key); None: no tenant, admin keys only


def valid_file_id(file_id: str) -> bool:
    """True for ids this store hands out."""
    return bool(_FILE_ID_RE.match(file_id))


def result_file_id(batch_id: str, kind: str) -> str:
    """The stable id of a batch's output ('output') or error ('errors') file."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:32]


class FileStore:
    """Files under `DATA_DIR/files`."""

    def __init__(self, data_dir: Path):
        self.root = data_dir / "files"

    def _folder(self, file_id: str) -> Path:
        if not valid_file_id(file_id):
            raise FileNotFound(file_id)
        return self.root / file_id

    def get(self, file_id: str, tenant: Tenant = OPERATOR) -> StoredFile:
        """The record of a file, or FileNotFound (also when `tenant` does not see it)."""
        record = self._folder(file_id) / "file.json"
        try:
            stored = StoredFile.model_validate_json(record.read_text())
        except FileNotFoundError:
            raise FileNotFound(file_id) from None
        if not tenant.sees(stored.owner):
            raise FileNotFound(file_id)
        return stored

    def content_path(self, file_id: str, tenant: Tenant = OPERATOR) -> Path:
        """Where a file's bytes are, or FileNotFound if they are gone (or `tenant` does not see them)."""
        path = Path(self.get(file_id, tenant).path)
        if not path.is_file():
            raise FileNotFound(file_id)
        return path

    def _save(self, stored: StoredFile) -> StoredFile:
        with atomic_path(self.root / stored.file.id / "file.json") as tmp:
            tmp.write_text(stored.model_dump_json())
        return stored

    def upload_path(self) -> Path:
        """A fresh path for an upload in progress (hidden from listings until `adopt`)."""
        folder = self.root / ".uploads"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / uuid.uuid4().hex

    def remove_stale_uploads(self, older_than_s: float) -> int:
        """Remove uploads left by a server that died mid-upload (untouched for `older_than_s`); returns how many."""
        folder = self.root / ".uploads"
        if not folder.is_dir():
            return 0
        removed = 0
        cutoff = time.time() - older_than_s
        for entry in os.scandir(folder):
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def adopt(self, upload: Path, filename: str, purpose: str, owner: str | None = None) -> FileObject:
        """Turn a finished upload into a file with a new id, owned by `owner` (a key fingerprint)."""
        file_id = "file-" + uuid.uuid4().hex
        folder = self.root / file_id
        folder.mkdir(parents=True)
        os.replace(upload, folder / "content")
        file = FileObject(id=file_id, bytes=(folder / "content").stat().st_size, created_at=int(time.time()),
                          filename=filename, purpose=purpose)  # type: ignore[arg-type]
        self._save(StoredFile(file=file, path=str(folder / "content"), owner=owner))
        return file

    def register_path(self, file_id: str, path: Location, filename: str, purpose: str, batch_id: str,
                      owner: str | None) -> str | None:
        """Expose a file that lives elsewhere (a batch's input or results) under a derived id, unless deleted;
        it belongs to the batch's owner."""
        folder = self.root / file_id
        if (folder / "deleted").exists():
            return None
        stat = path.stat()
        if (folder / "file.json").exists():
            stored = StoredFile.model_validate_json((folder / "file.json").read_text())
            if stored.file.bytes == stat.st_size and stored.path == str(path) and stored.owner == owner:
                return file_id
        file = FileObject(id=file_id, bytes=stat.st_size, created_at=int(stat.st_mtime), filename=filename,
                          purpose=purpose)  # type: ignore[arg-type]
        self._save(StoredFile(file=file, path=str(path), batch_id=batch_id, owner=owner))
        return file_id

    def register_result(self, batch_id: str, kind: str, path: Location, owner: str | None) -> str | None:
        """Expose a batch's results file ('output' or 'errors') as a `batch_output` file; returns its id."""
        name = "output.jsonl" if kind == "output" else "errors.jsonl"
        return self.register_path(result_file_id(batch_id, kind), path, f"{batch_id}_{name}", "batch_output",
                                  batch_id, owner)

    def attach(self, batch: Batch, paths: BatchPaths, input_path: Path, owner: str | None) -> Batch:
        """Fill in the batch's file ids: its input (for batches not made from an upload) and its results,
        owned by the batch's owner."""
        if not batch.input_file_id and input_path.is_file():
            batch.input_file_id = self.register_path(result_file_id(batch.id, "input"), input_path, input_path.name,
                                                     "batch", batch.id, owner) or ""
        if batch.status in ("completed", "cancelled", "expired"):
            # A finished batch always has an output file (maybe empty); a stopped one only if it got somewhere.
            if paths.output.exists() and (batch.status == "completed" or paths.output.stat().st_size > 0):
                batch.output_file_id = self.register_result(batch.id, "output", paths.output, owner)
            if paths.errors.exists() and paths.errors.stat().st_size > 0:
                batch.error_file_id = self.register_result(batch.id, "errors", paths.errors, owner)
        return batch

    def delete(self, file_id: str, tenant: Tenant = OPERATOR) -> None:
        """Remove an uploaded file; for a file that lives elsewhere only the record goes (the batch keeps it)."""
        stored = self.get(file_id, tenant)
        folder = self._folder(file_id)
        if stored.batch_id is None:
            shutil.rmtree(folder)
            return
        (folder / "deleted").touch()  # so reading the batch again does not bring the record back
        (folder / "file.json").unlink()

    def list(self, purpose: str | None = None, tenant: Tenant = OPERATOR) -> Iterator[FileObject]:
        """Every file `tenant` sees, newest first."""
        if not self.root.is_dir():
            return iter(())
        files = []
        for entry in os.scandir(self.root):
            if not valid_file_id(entry.name):
                continue
            try:
                files.append(self.get(entry.name, tenant).file)
            except (FileNotFound, ValueError):
                continue  # another tenant's, or being written or deleted right now
        files.sort(key=lambda f: (f.created_at, f.id), reverse=True)
        return iter(f for f in files if purpose is None or f.purpose == purpose)
