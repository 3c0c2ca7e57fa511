"""Where a batch's files live, and how they are written so that a crash never leaves half a file.

The data root is a local folder (the default) or an object-store URI (`s3://bucket/prefix`,
`gs://bucket/prefix`; the `objectstore` extra), so that runs on different hosts share every batch's
files. A local path stays a `pathlib.Path` and never goes through fsspec; a URI becomes a `UPath`
(universal_pathlib), imported only then. Either way a file is published whole or not at all: locally
by fsync + rename, on an object store by one PUT of the finished file (an object store shows an
object only once its upload completes), so present means complete on both.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Union

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import ConfigurableResource

if TYPE_CHECKING:
    from upath import UPath

# A batch file's location: a local path, or a path on an object store.
Location = Union[Path, "UPath"]

_CHUNK_RE = re.compile(r"^chunk-(\d{6})\.parquet$")
OBJECT_STORE_EXTRA = "objectstore"


class StorageConfigError(ValueError):
    """The data root cannot be used (an unknown scheme, or the objectstore extra is missing)."""


# A write that found no room: the disk or the quota is full, or the process's file size limit was reached.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class StorageError(OSError):
    """A batch file could not be written (or listed): one line says which, why, and that nothing was published."""


class StorageFull(StorageError):
    """A file could not be written for want of space; nothing was published at its name."""

    def __init__(self, target: Location, cause: OSError):
        super().__init__(f"no space left to write {target} ({os.strerror(cause.errno or errno.ENOSPC)}); "
                         "nothing was published there: free space and run the batch again")
        self.errno = cause.errno


class StorageUnavailable(StorageError):
    """The object store did not take (or list) a file, after the client's own retries: down, unreachable, refusing."""


def _no_room(exc: BaseException) -> bool:
    # pyarrow's writers report the errno only in their message ("[errno 28] No space left on device").
    if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
        return True
    return isinstance(exc, OSError) and any(f"[errno {code}]" in str(exc).lower() for code in _NO_ROOM)


def is_uri(location: str) -> bool:
    """True for an object-store URI (`s3://...`, `gs://...`), False for a local path."""
    return "://" in location


def location(root: str) -> Location:
    """The data root as a path object: `Path` for a local folder, `UPath` for a URI."""
    if not is_uri(root):
        return Path(root)
    try:
        from upath import UPath
    except ImportError:
        raise StorageConfigError(f"the data root {root} is a URI: install the {OBJECT_STORE_EXTRA} extra "
                                 f"(pip install 'vllm-batch-pipeline[{OBJECT_STORE_EXTRA}]')") from None
    try:
        # No listing cache: chunks written by other hosts must show up at the next listing.
        return UPath(root, use_listings_cache=False)
    except (ImportError, ValueError) as exc:
        raise StorageConfigError(f"the data root {root} cannot be opened: {exc}") from None


def is_local(path: Location) -> bool:
    """True when `path` is on the local file system (the fast path that never touches fsspec)."""
    return isinstance(path, Path)


@contextmanager
def atomic_path(target: Location) -> Iterator[Path]:
    """Yield a temporary local path; on success its content appears at `target` whole (fsync + rename
    locally, one upload on an object store), on failure nothing appears.

    StorageFull when the disk (or quota, or file size limit) had no room for it, whoever raised it: the
    writer in the `with` block, the fsync or the upload's local copy.
    """
    try:
        if not isinstance(target, Path):
            with _atomic_object(target) as tmp:
                yield tmp
            return
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
    except OSError as exc:
        if isinstance(exc, StorageError) or not _no_room(exc):
            raise
        raise StorageFull(target, exc) from exc


@contextmanager
def _atomic_object(target: UPath) -> Iterator[Path]:
    # The file is written locally and uploaded once it is complete. S3 and GCS make an object visible
    # only when its upload finishes (a multipart or resumable upload too), so a writer killed at any
    # point leaves either the previous object or none: no temporary object, no server-side copy.
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        try:
            target.fs.put_file(str(tmp), target.path)
        except Exception as exc:  # whatever the client raises (botocore, aiohttp, gcsfs): no object was published
            raise StorageUnavailable(f"could not write {target} ({_first_line(exc)}): nothing was published there; "
                                     "run the batch again once the object store answers") from exc
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def local_copy(path: Location) -> Iterator[Path]:
    """The file as a local path: itself when local, else a downloaded temporary copy (removed after)."""
    if isinstance(path, Path):
        yield path
        return
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".download")
    os.close(handle)
    tmp = Path(name)
    try:
        path.fs.get_file(path.path, str(tmp))
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def upload(source: Path, target: Location) -> None:
    """Copy a local file to `target`, whole or not at all."""
    if isinstance(target, Path):
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    else:  # one upload of a finished file is already all-or-nothing
        target.fs.put_file(str(source), target.path)


def download(source: Location, target: Path) -> None:
    """Copy `source` to a local file."""
    if isinstance(source, Path):
        shutil.copyfile(source, target)
    else:
        source.fs.get_file(source.path, str(target))


def remove_tree(folder: Location) -> None:
    """Remove a folder (or every object under a prefix) if it exists."""
    if isinstance(folder, Path):
        shutil.rmtree(folder, ignore_errors=True)
        return
    try:
        folder.fs.rm(folder.path, recursive=True)
    except FileNotFoundError:
        pass


def read_blocks(path: Location, size: int = 1 << 20) -> Iterator[bytes]:
    """A file's bytes in blocks of `size` (streamed from the store, never held whole)."""
    with path.open("rb") as handle:
        while block := handle.read(size):
            yield block


def remove_file(path: Location) -> None:
    """Delete one file (one object); one that is already gone is not an error, so a retry is harmless."""
    if isinstance(path, Path):
        path.unlink(missing_ok=True)
        return
    try:
        path.fs.rm_file(path.path)
    except FileNotFoundError:  # gcsfs answers a missing object so; S3 deletes a missing key quietly
        pass


def is_inside(path: Location, root: Location) -> bool:
    """True when `path` lies under the folder `root`: the same local tree, or the same store and prefix."""
    if isinstance(path, Path) or isinstance(root, Path):
        if not (isinstance(path, Path) and isinstance(root, Path)):
            return False
        return path.resolve().is_relative_to(root.resolve())
    if path.protocol != root.protocol:
        return False
    inner, outer = posixpath.normpath(path.path), posixpath.normpath(root.path).rstrip("/")
    return inner.startswith(outer + "/")


def list_names(folder: Location) -> list[str]:
    """The names of the entries in a folder (an empty list if it does not exist)."""
    if isinstance(folder, Path):
        if not folder.is_dir():
            return []
        return [entry.name for entry in os.scandir(folder)]
    try:
        return [name.rstrip("/").rsplit("/", 1)[-1] for name in folder.fs.ls(folder.path, detail=False)]
    except FileNotFoundError:
        return []
    except Exception as exc:  # the store down or refusing: not an empty folder, which would mean "nothing done"
        raise StorageUnavailable(f"could not list {folder} ({_first_line(exc)}); "
                                 "run the batch again once the object store answers") from exc


class ParquetDamaged(ValueError):
    """A parquet file was read but its bytes are not a whole parquet file (cut short, empty, overwritten)."""

    def __init__(self, path: Location, reason: str):
        super().__init__(f"{path} is damaged ({reason})")
        self.path, self.reason = path, reason


# Parsing bytes already in memory: whatever fails now is the file's content, never the disk or the network
# (pyarrow reports a damaged page or footer as a plain OSError, like an error reaching the file).
_PARSE_ERRORS = (pa.ArrowException, OSError, EOFError)
_MAGIC = b"PAR1"


def read_parquet(path: Location, columns: list[str] | None = None, filters: list | None = None) -> pa.Table:
    """A parquet file's table (the named columns only; the rows `filters` keeps, in pyarrow's filter form);
    ParquetDamaged if its content is not a parquet file
    with those columns. An error reaching the file (missing, unreadable disk, store down) is raised as it is."""
    data = path.read_bytes()
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns, filters=filters)
    except _PARSE_ERRORS as exc:
        raise ParquetDamaged(path, _first_line(exc)) from None


def parquet_footer(path: Location, guess: int = 64 << 10) -> pq.FileMetaData:
    """A parquet file's footer (rows, schema) from the end of the file: one ranged read on an object store.
    ParquetDamaged if the file does not end in a parquet footer; errors reaching the file are raised as they are."""
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size < 3 * len(_MAGIC):
            raise ParquetDamaged(path, f"{size} bytes, too short for a parquet file")
        handle.seek(max(size - guess, 0))
        tail = handle.read()
        if tail[-4:] != _MAGIC:
            raise ParquetDamaged(path, "it does not end in a parquet footer")
        needed = int.from_bytes(tail[-8:-4], "little") + 8
        if needed > size - len(_MAGIC):
            raise ParquetDamaged(path, f"its footer claims {needed} bytes of a {size}-byte file")
        if needed > len(tail):
            handle.seek(size - needed)
            tail = handle.read()
    try:
        # The footer alone, behind the leading magic, reads as a file whose data pages are not there.
        return pq.ParquetFile(pa.BufferReader(_MAGIC + tail[-needed:])).metadata
    except _PARSE_ERRORS as exc:
        raise ParquetDamaged(path, _first_line(exc)) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def parquet_file(path: Location) -> Iterator[pq.ParquetFile]:
    """A parquet file opened for lazy reading of its row groups (ranged reads on an object store)."""
    if isinstance(path, Path):
        source = pq.ParquetFile(path)
        try:
            yield source
        finally:
            source.close()
        return
    with path.open("rb") as handle:
        yield pq.ParquetFile(handle)


class BatchPaths:
    """The files of one batch under `DATA_DIR/batches/<batch_id>/`."""

    def __init__(self, root: Location):
        self.root = root

    @property
    def spec(self) -> Location:
        return self.root / "batch.json"

    @property
    def submission(self) -> Location:
        return self.root / "submission.json"

    @property
    def requests(self) -> Location:
        return self.root / "input" / "requests.parquet"

    @property
    def invalid(self) -> Location:
        return self.root / "input" / "invalid.jsonl"

    @property
    def source(self) -> Location:
        """The input file copied beside the batch, when the data root is an object store."""
        return self.root / "input" / "source.jsonl"

    @property
    def manifest(self) -> Location:
        return self.root / "input" / "manifest.json"

    @property
    def chunks_dir(self) -> Location:
        return self.root / "chunks"

    def chunk(self, index: int) -> Location:
        return self.chunks_dir / f"chunk-{index:06d}.parquet"

    def finished_chunks(self) -> set[int]:
        """Indexes of the chunks already written (each write is atomic, so present means complete)."""
        # Only exact chunk names count: a writer's temporary file or object never matches.
        found = set()
        for name in list_names(self.chunks_dir):
            match = _CHUNK_RE.match(name)
            if match:
                found.add(int(match.group(1)))
        return found

    @property
    def results_dir(self) -> Location:
        return self.root / "results"

    @property
    def output(self) -> Location:
        return self.results_dir / "output.jsonl"

    @property
    def errors(self) -> Location:
        return self.results_dir / "errors.jsonl"

    @property
    def results_parquet(self) -> Location:
        return self.results_dir / "results.parquet"

    @property
    def summary(self) -> Location:
        return self.results_dir / "summary.json"

    @property
    def replay_record(self) -> Location:
        """What it takes to run a finished batch again the same way (batch_pipeline/domain/replay.py)."""
        return self.results_dir / "replay.json"

    @property
    def estimate(self) -> Location:
        """The batch's work and its finishing time as estimated when it was created (domain/estimate.py)."""
        return self.root / "estimate.json"

    @property
    def stopped(self) -> Location:
        """The counts of a batch stopped early (cancelled or expired), beside its partial results."""
        return self.results_dir / "stopped.json"


class BatchStorage(ConfigurableResource):
    """The data folder that holds every batch's input, chunks and results."""

    data_dir: str  # a local folder or an object-store URI (s3://bucket/prefix, gs://bucket/prefix)

    def batch(self, batch_id: str) -> BatchPaths:
        """The paths of one batch (the id is a validated partition key)."""
        return BatchPaths(location(self.data_dir) / "batches" / batch_id)
