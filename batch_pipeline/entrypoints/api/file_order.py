"""The order `GET /v1/files` pages in: every file's (created_at, id), kept sorted in memory.

OpenAI lists files by `created_at` (newest first unless `order=asc`) and pages with a cursor, the last
id of the previous page. Kept sorted as files come and go, a page is a binary search for the cursor
and a walk of `limit` entries, instead of reading and sorting every record per request. Each entry
carries what decides whether a key sees it without reading the record (its purpose and owner); the
file store (files.py) keeps the entries true to the records on disk.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator
from typing import NamedTuple


class Listed(NamedTuple):
    """One file as the listing sees it."""

    created_at: int
    file_id: str
    purpose: str
    owner: str | None

    @property
    def key(self) -> tuple[int, str]:
        return self.created_at, self.file_id


class FileOrder:
    """Listed files sorted by (created_at, id), with the place of every id ever listed, for cursors."""

    def __init__(self) -> None:
        self._keys: list[tuple[int, str]] = []  # ascending
        self._entries: dict[str, Listed] = {}
        # A cursor may name a file deleted since its page was read (a client deleting as it walks):
        # its last place still says where the next page starts.
        self._places: dict[str, tuple[int, str]] = {}

    def __contains__(self, file_id: str) -> bool:
        return file_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def ids(self) -> set[str]:
        """The ids listed now."""
        return set(self._entries)

    def put(self, entry: Listed) -> bool:
        """Add or update a file; True when its place in the order changed."""
        old = self._entries.get(entry.file_id)
        self._entries[entry.file_id] = entry
        if old is not None and old.key == entry.key:
            return False
        if old is not None:
            del self._keys[bisect_left(self._keys, old.key)]
        insort(self._keys, entry.key)
        self._places[entry.file_id] = entry.key
        return True

    def drop(self, file_id: str) -> None:
        """Take a file out of the order (its place stays known, for a cursor naming it)."""
        old = self._entries.pop(file_id, None)
        if old is not None:
            del self._keys[bisect_left(self._keys, old.key)]

    def walk(self, after: str | None = None, descending: bool = True) -> Iterator[Listed]:
        """The files after the file `after` (from the start when None), newest first when `descending`;
        KeyError for an id never listed."""
        if after is None:
            start = len(self._keys) - 1 if descending else 0
        else:
            place = self._places[after]
            start = bisect_left(self._keys, place) - 1 if descending else bisect_right(self._keys, place)
        positions = range(start, -1, -1) if descending else range(start, len(self._keys))
        return (self._entries[self._keys[position][1]] for position in positions)
