"""The file store behind `/v1/files`: uploaded batch inputs, and batch results exposed as files.

Every file is a folder `DATA_DIR/files/<file_id>/` holding `file.json` (the record) and, for uploads,
`content`. A batch's output and error files are not copied: their record points at the results
folder, and their ids are derived from the batch id, so they can be registered again at any time.
File ids are opaque (`file-` and hex digits) and are checked before they touch a path.

A file may expire (`expires_at`, from the upload's `expires_after` or the batch's
`output_expires_after`). From that moment it answers 404, as a deleted file does; `expire_due` (the
API server's timer) then deletes its bytes and leaves `expired` beside the folder's record in place of
`file.json`, so the id is never handed out or registered again.

Every record carries its owner (batch_pipeline/domain/tenancy.py: the fingerprint of the key that uploaded
it, or that created the batch a results file belongs to; None for no tenant). Reading a record another
tenant owns is FileNotFound, as for an id that does not exist.

`GET /v1/files` pages through a FileOrder (file_order.py) held in memory: filled from every record once,
then kept up to date from this store's own writes and from the folder, which other processes (the
command line registers batches' results) write to as well. Every change of a record, by any process,
ends by writing a new token to `files/.changes`: while the token is the one the last listing saw, a
listing trusts the records it read then instead of checking each file.json again (10,000 stats a page).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from batch_pipeline.domain.tenancy import OPERATOR, Tenant
from batch_pipeline.entrypoints.api.file_order import FileOrder, Listed
from batch_pipeline.entrypoints.api.schemas import Batch, FileObject
from resources.storage import BatchPaths, Location, atomic_path, is_inside, location, remove_file

log = logging.getLogger(__name__)

_FILE_ID_RE = re.compile(r"^file-[0-9a-f]{24,64}$")
# A folder's mtime moves in steps of the kernel's clock tick (milliseconds): a file folder created in the
# same tick as a scan of the files folder, just after it, leaves the mtime as the scan saw it. So the
# folder is scanned again on every listing until its mtime is older than this.
_RESCAN_WINDOW_NS = 2_000_000_000
_CHANGES = ".changes"


class FileNotFound(Exception):
    """No file has this id (or the id is not a file id at all)."""


class FileExpired(FileNotFound):
    """The file had an expiry and it passed: its bytes are deleted (or about to be)."""

    def __init__(self, file_id: str, expires_at: int):
        super().__init__(f"{file_id} (it expired at {expires_at} and was deleted)")
        self.file_id = file_id
        self.expires_at = expires_at


class StoredFile(BaseModel):
    """file.json: the public record plus where the bytes are."""

    file: FileObject
    path: str
    batch_id: str | None = None
    owner: str | None = None  # the tenant's key fingerprint (never the key); None: no tenant, admin keys only


def valid_file_id(file_id: str) -> bool:
    """True for ids this store hands out."""
    return bool(_FILE_ID_RE.match(file_id))


def _listed(stored: StoredFile) -> Listed:
    return Listed(stored.file.created_at, stored.file.id, stored.file.purpose, stored.owner)


def result_file_id(batch_id: str, kind: str) -> str:
    """The stable id of a batch's output ('output') or error ('errors') file."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:32]


class FileStore:
    """Files under `DATA_DIR/files`."""

    def __init__(self, data_dir: Path):
        self.root = data_dir / "files"
        self._root = str(self.root)
        # Parsed records by file id, with the (inode, mtime, size) of the file.json they were read from:
        # a listing reads the record of every file on its page, and a record is only ever replaced whole
        # (a new inode).
        self._records: dict[str, tuple[tuple[int, int, int], StoredFile]] = {}
        self._order = FileOrder()
        self._order_lock = threading.Lock()
        self._scanned_mtime: int | None = None  # of the files folder, when the order last took in its folders
        self._unsettled: set[str] = set()  # folders whose record is not written yet: read again each listing
        self._listed_token: str | None = None  # the changes token the last listing read
        self._checked: set[str] = set()  # ids whose record was read or checked since that token was written
        self._settled: set[str] = set()  # folders of deleted or expired files: they never list again

    def _folder(self, file_id: str) -> Path:
        if not valid_file_id(file_id):
            raise FileNotFound(file_id)
        return self.root / file_id

    def get(self, file_id: str, tenant: Tenant = OPERATOR, now: float | None = None) -> StoredFile:
        """The record of a file, or FileNotFound (also when `tenant` does not see it; FileExpired once its
        expiry has passed, swept or not)."""
        folder = self._folder(file_id)
        try:
            stored = self._record(file_id, str(folder / "file.json"))
        except FileNotFoundError:
            tombstone = folder / "expired"
            if tombstone.exists():
                raise FileExpired(file_id, int(tombstone.read_text() or 0)) from None
            raise FileNotFound(file_id) from None
        if not tenant.sees(stored.owner):
            raise FileNotFound(file_id)
        expires_at = stored.file.expires_at
        if expires_at is not None and expires_at <= (time.time() if now is None else now):
            raise FileExpired(file_id, expires_at)
        return stored

    def _record(self, file_id: str, path: str) -> StoredFile:
        stat = os.stat(path)  # str paths: a listing reads thousands of records, and pathlib costs more than the stat
        signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        cached = self._records.get(file_id)
        if cached is not None and cached[0] == signature:
            return cached[1]  # shared: nothing changes a record in place (a change is a new file.json)
        with open(path, encoding="utf-8") as handle:
            stored = StoredFile.model_validate_json(handle.read())
        self._records[file_id] = (signature, stored)
        return stored

    def content(self, file_id: str, tenant: Tenant = OPERATOR) -> Location:
        """Where a file's bytes are (a local path, or an object under an object-store data root), or
        FileNotFound if they are gone (or `tenant` does not see them)."""
        path = location(self.get(file_id, tenant).path)
        if not path.is_file():
            raise FileNotFound(file_id)
        return path

    def content_path(self, file_id: str, tenant: Tenant = OPERATOR) -> Path:
        """The local path of an uploaded file's bytes (uploads stay on this host), or FileNotFound."""
        path = self.content(file_id, tenant)
        if not isinstance(path, Path):
            raise FileNotFound(file_id)
        return path

    def _save(self, stored: StoredFile) -> StoredFile:
        with atomic_path(self.root / stored.file.id / "file.json") as tmp:
            tmp.write_text(stored.model_dump_json())
        self._changed()
        with self._order_lock:
            self._order.put(_listed(stored))
        return stored

    def _changed(self) -> None:
        """Tell every process's listing that a record changed (after the change: a listing that read the
        old token checks every record next time)."""
        with atomic_path(self.root / _CHANGES) as tmp:
            tmp.write_text(uuid.uuid4().hex)

    def _changes_token(self) -> str | None:
        try:
            with open(f"{self._root}/{_CHANGES}", encoding="ascii") as handle:
                return handle.read()
        except FileNotFoundError:
            return None  # no change yet, or records of a version without the token: check every record

    def _unlist(self, file_id: str, settled: bool) -> None:
        with self._order_lock:
            self._order.drop(file_id)
            if settled:
                self._settled.add(file_id)

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

    def adopt(self, upload: Path, filename: str, purpose: str, owner: str | None = None,
              expires_after: int | None = None) -> FileObject:
        """Turn a finished upload into a file with a new id, owned by `owner` (a key fingerprint), expiring
        `expires_after` seconds from now."""
        file_id = "file-" + uuid.uuid4().hex
        folder = self.root / file_id
        folder.mkdir(parents=True)
        os.replace(upload, folder / "content")
        created_at = int(time.time())
        file = FileObject(id=file_id, bytes=(folder / "content").stat().st_size, created_at=created_at,
                          filename=filename, purpose=purpose,  # type: ignore[arg-type]
                          expires_at=created_at + expires_after if expires_after else None)
        self._save(StoredFile(file=file, path=str(folder / "content"), owner=owner))
        return file

    def expired(self, file_id: str) -> bool:
        """True for a file the sweep deleted at its expiry."""
        return (self._folder(file_id) / "expired").exists()

    def register_path(self, file_id: str, path: Location, filename: str, purpose: str, batch_id: str,
                      owner: str | None, expires_after: int | None = None) -> str | None:
        """Expose a file that lives elsewhere (a batch's input or results) under a derived id, unless deleted
        (an expired one keeps its id, which answers 404 as OpenAI's expired files do)."""
        folder = self.root / file_id
        if (folder / "deleted").exists():
            return None
        if (folder / "expired").exists():
            return file_id
        stat = path.stat()
        if (folder / "file.json").exists():
            stored = StoredFile.model_validate_json((folder / "file.json").read_text())
            if stored.file.bytes == stat.st_size and stored.path == str(path) and stored.owner == owner:
                return file_id
        created_at = int(stat.st_mtime)  # OpenAI anchors an output file's expiry at the file's creation
        file = FileObject(id=file_id, bytes=stat.st_size, created_at=created_at, filename=filename,
                          purpose=purpose,  # type: ignore[arg-type]
                          expires_at=created_at + expires_after if expires_after else None)
        self._save(StoredFile(file=file, path=str(path), batch_id=batch_id, owner=owner))
        return file_id

    def register_result(self, batch_id: str, kind: str, path: Location, owner: str | None,
                        expires_after: int | None = None) -> str | None:
        """Expose a batch's results file ('output' or 'errors') as a `batch_output` file; returns its id."""
        name = "output.jsonl" if kind == "output" else "errors.jsonl"
        return self.register_path(result_file_id(batch_id, kind), path, f"{batch_id}_{name}", "batch_output",
                                  batch_id, owner, expires_after)

    def attach(self, batch: Batch, paths: BatchPaths, input_path: Path, owner: str | None,
               output_expires_after: int | None = None) -> Batch:
        """Fill in the batch's file ids: its input (for batches not made from an upload) and its results,
        owned by the batch's owner."""
        if not batch.input_file_id and input_path.is_file():
            batch.input_file_id = self.register_path(result_file_id(batch.id, "input"), input_path, input_path.name,
                                                     "batch", batch.id, owner) or ""
        if batch.status in ("completed", "cancelled", "expired"):
            for kind, path in (("output", paths.output), ("errors", paths.errors)):
                file_id = result_file_id(batch.id, kind)
                if self.expired(file_id):
                    found: str | None = file_id  # its bytes are gone; the id stays and answers 404
                # A finished batch always has an output file (maybe empty); a stopped one only if it got
                # somewhere, and an error file only if there was an error.
                elif path.exists() and (path.stat().st_size > 0 or (kind == "output" and batch.status == "completed")):
                    found = self.register_result(batch.id, kind, path, owner, output_expires_after)
                else:
                    found = None
                if kind == "output":
                    batch.output_file_id = found
                else:
                    batch.error_file_id = found
        return batch

    def expire_due(self, roots: Sequence[Location], now: float) -> list[str]:
        """Delete every file whose expiry has passed (bytes and record; a tombstone keeps the id); returns
        the ids. Only bytes under one of `roots` (the local data folder, the data root: a folder or an
        object-store prefix) are ever deleted.

        Each step may be repeated: a sweep that dies part-way leaves the record of a file whose bytes
        may already be gone, and the next sweep deletes again (a missing file or object is no error),
        then writes the tombstone and removes the record. A file whose bytes cannot be deleted now (the
        object store is unreachable) keeps its record and is tried again by the next sweep; it answers
        404 meanwhile all the same.
        """
        expired = []
        for file_id in self._ids():
            folder = self.root / file_id
            try:
                stored = StoredFile.model_validate_json((folder / "file.json").read_text())
            except (FileNotFoundError, ValueError):
                continue
            expires_at = stored.file.expires_at
            if expires_at is None or expires_at > now:
                continue
            try:
                path = location(stored.path)
                if any(is_inside(path, root) for root in roots):
                    remove_file(path)
            except Exception:  # one unreachable object must not keep the other files from expiring
                log.exception("could not delete the bytes of expired file %s at %s", file_id, stored.path)
                continue
            (folder / "expired").write_text(str(expires_at))  # before the record goes: the id never 404s as unknown
            (folder / "file.json").unlink(missing_ok=True)
            self._changed()
            self._unlist(file_id, settled=True)
            expired.append(file_id)
        return expired

    def _ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [entry.name for entry in os.scandir(self.root) if valid_file_id(entry.name)]

    def delete(self, file_id: str, tenant: Tenant = OPERATOR) -> None:
        """Remove an uploaded file; for a file that lives elsewhere only the record goes (the batch keeps it)."""
        stored = self.get(file_id, tenant)
        folder = self._folder(file_id)
        if stored.batch_id is None:
            shutil.rmtree(folder)
            self._changed()
            self._unlist(file_id, settled=False)
            return
        (folder / "deleted").touch()  # so reading the batch again does not bring the record back
        (folder / "file.json").unlink()
        self._changed()
        self._unlist(file_id, settled=True)

    def page(self, limit: int, after: str | None = None, descending: bool = True, purpose: str | None = None,
             tenant: Tenant = OPERATOR, now: float | None = None) -> tuple[list[FileObject], bool]:
        """Up to `limit` files `tenant` sees, newest first (oldest first unless `descending`), from the one
        after the file `after`, and whether more follow; FileNotFound for an `after` never listed here."""
        now = time.time() if now is None else now
        with self._order_lock:
            token = self._changes_token()  # before reading anything: a change after it shows next time
            if token is None or token != self._listed_token:
                self._checked.clear()
                self._listed_token = token
            self._refresh_order()
            # A record rewritten by another process since it was ordered (a batch's results registered
            # again with a new created_at) is put in its new place, and the page is walked again.
            for _ in range(3):
                files, more, moved = self._walk(limit, after, descending, purpose, tenant, now)
                if not moved:
                    break
        return files, more

    def _walk(self, limit: int, after: str | None, descending: bool, purpose: str | None, tenant: Tenant,
              now: float) -> tuple[list[FileObject], bool, bool]:
        try:
            entries = self._order.walk(after, descending)
        except KeyError:
            raise FileNotFound(after) from None
        files: list[FileObject] = []
        changed: list[StoredFile] = []
        gone: list[str] = []
        more = False
        for entry in entries:
            if (purpose is not None and entry.purpose != purpose) or not tenant.sees(entry.owner):
                continue
            stored = self._checked_record(entry.file_id)
            if stored is None:
                gone.append(entry.file_id)
                continue
            if (stored.file.created_at != entry.created_at or stored.file.purpose != entry.purpose
                    or stored.owner != entry.owner):
                changed.append(stored)
                continue
            expires_at = stored.file.expires_at
            if expires_at is not None and expires_at <= now:
                continue  # expired, not swept yet
            if len(files) == limit:
                more = True
                break
            files.append(stored.file)
        moved = False
        for stored in changed:
            moved = self._order.put(_listed(stored)) or moved
        for file_id in gone:
            self._order.drop(file_id)
            self._settle(file_id)
        return files, more, moved or bool(changed)

    def _checked_record(self, file_id: str) -> StoredFile | None:
        """The record as a listing sees it: the one read since the last change by any process, without
        touching its file again, or read (checked) now."""
        if file_id in self._checked:
            return self._records[file_id][1]
        stored = self._current(file_id)
        if stored is not None and self._listed_token is not None:
            self._checked.add(file_id)
        return stored

    def _current(self, file_id: str) -> StoredFile | None:
        try:
            return self._record(file_id, f"{self._root}/{file_id}/file.json")
        except (FileNotFoundError, ValueError):
            return None  # being written, deleted or expired

    def _refresh_order(self) -> None:
        """Take into the order the file folders created and removed since the last listing, by any process."""
        try:
            mtime = self.root.stat().st_mtime_ns  # before the scan: a folder created during it scans again
        except FileNotFoundError:
            return
        unsettled, self._unsettled = self._unsettled, set()
        if mtime != self._scanned_mtime:
            present = set(self._ids())
            for file_id in self._order.ids() - present:
                self._order.drop(file_id)
            self._settled &= present
            unsettled |= present - self._order.ids() - self._settled
            self._scanned_mtime = mtime if time.time_ns() - mtime > _RESCAN_WINDOW_NS else None
        for file_id in unsettled:
            stored = self._current(file_id)
            if stored is not None:
                self._order.put(_listed(stored))
            else:
                self._settle(file_id)

    def _settle(self, file_id: str) -> None:
        """File away a folder without a record: gone for good (deleted, expired), or not written yet."""
        folder = self.root / file_id
        if (folder / "deleted").exists() or (folder / "expired").exists():
            self._settled.add(file_id)
        elif folder.is_dir():
            self._unsettled.add(file_id)
