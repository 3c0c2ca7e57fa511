"""The response cache's files: responses kept under the data root, found by a content hash.

Layout: `DATA_ROOT/response-cache/v1/<shard>/<segment>.parquet`. The shard is the key's first hex digit
(16 shards), so a lookup reads only the shards its keys fall in and never the whole cache. A segment
holds `(key, body, prompt_tokens, completion_tokens)` rows sorted by key, in row groups of 1,024, so a
filtered read skips the row groups whose key range misses. Segments are written whole (`atomic_path`:
fsync + rename locally, one upload on an object store), so a second host or a restarted instance sees
complete segments only.

Segments merge by size tier: a store writes level-0 segments; when a shard holds four segments of one
level they are merged into one of the next level. A shard then holds at most three segments a level,
about log4(entries) levels, so lookups stay a handful of reads however many batches wrote entries.

The size bound: `evict()` deletes whole segments, oldest first (by the time in their name, the newest
entry's write for a merged segment) until the cache's total bytes are within `max_bytes`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import ConfigurableResource

from resources.storage import Location, atomic_path, list_names, location, read_parquet, remove_file

log = logging.getLogger(__name__)

CACHE_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("body", pa.string()),  # the response body, JSON
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
])
_ROW_GROUP = 1024
_MERGE_AT = 4  # segments of one level that merge into one of the next


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cached response: its key (sha256 hex) and the response body as JSON."""

    key: str
    body: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class _Segment:
    name: str  # <ms since the epoch, 13 digits>-L<level>-<random>.parquet

    @property
    def written_ms(self) -> int:
        return int(self.name.split("-", 1)[0])

    @property
    def level(self) -> int:
        return int(self.name.split("-")[1][1:])


def _segment_name(level: int, written_ms: int | None = None) -> str:
    return f"{written_ms or int(time.time() * 1000):013d}-L{level}-{uuid.uuid4().hex[:12]}.parquet"


def _is_segment(name: str) -> bool:
    parts = name.split("-")
    return name.endswith(".parquet") and len(parts) == 3 and parts[0].isdigit() and parts[1].startswith("L")


class ResponseCache(ConfigurableResource):
    """Responses answered before, under the data root; `enabled` False makes every lookup miss and stores nothing."""

    data_dir: str  # the data root: a local folder or an object-store URI
    enabled: bool = False
    max_bytes: int = 1 << 30

    @property
    def root(self) -> Location:
        return location(self.data_dir) / "response-cache" / "v1"

    def _shard(self, key: str) -> Location:
        return self.root / key[0]

    def _segments(self, shard: Location) -> list[_Segment]:
        return sorted((_Segment(name) for name in list_names(shard) if _is_segment(name)),
                      key=lambda s: s.name)

    def lookup(self, keys: Iterable[str]) -> dict[str, CacheEntry]:
        """The cached entries of those keys that have one (reading only the shards they fall in)."""
        by_shard: dict[str, set[str]] = defaultdict(set)
        for key in keys:
            by_shard[key[0]].add(key)
        found: dict[str, CacheEntry] = {}
        for shard_name, wanted in by_shard.items():
            shard = self.root / shard_name
            for segment in self._segments(shard):
                missing = sorted(wanted - found.keys())
                if not missing:
                    break
                try:
                    table = read_parquet(shard / segment.name, filters=[("key", "in", missing)])
                except FileNotFoundError:  # merged or evicted by another process since the listing
                    continue
                for row in table.to_pylist():
                    found[row["key"]] = CacheEntry(**row)
        return found

    def store(self, entries: Iterable[CacheEntry]) -> None:
        """Write `entries` as one new segment per shard they fall in, then merge full levels."""
        by_shard: dict[str, list[CacheEntry]] = defaultdict(list)
        for entry in entries:
            by_shard[entry.key[0]].append(entry)
        for shard_name, shard_entries in by_shard.items():
            shard = self.root / shard_name
            table = pa.Table.from_pylist([_row(entry) for entry in shard_entries], schema=CACHE_SCHEMA)
            self._write(shard / _segment_name(0), table)
            self._merge_levels(shard)

    def _write(self, target: Location, table: pa.Table) -> None:
        table = table.sort_by("key")
        with atomic_path(target) as tmp:
            pq.write_table(table, tmp, row_group_size=_ROW_GROUP)

    def _merge_levels(self, shard: Location) -> None:
        while True:
            levels: dict[int, list[_Segment]] = defaultdict(list)
            for segment in self._segments(shard):
                levels[segment.level].append(segment)
            full = next((level for level in sorted(levels) if len(levels[level]) >= _MERGE_AT), None)
            if full is None:
                return
            merging = levels[full][:_MERGE_AT]
            try:
                tables = [read_parquet(shard / segment.name) for segment in merging]
            except FileNotFoundError:  # another process merged them first
                return
            # One row per key: a key written twice (two batches at once) holds the same deterministic answer.
            merged = _unique_keys(pa.concat_tables(tables))
            newest = max(segment.written_ms for segment in merging)
            self._write(shard / _segment_name(full + 1, newest), merged)
            for segment in merging:
                remove_file(shard / segment.name)

    def size(self) -> int:
        """The cache's total bytes on disk (or on the store)."""
        return sum(size for _, size in self._all_segments())

    def _all_segments(self) -> list[tuple[Location, int]]:
        found = []
        for shard_name in list_names(self.root):
            shard = self.root / shard_name
            for segment in self._segments(shard):
                path = shard / segment.name
                try:
                    found.append((path, path.stat().st_size))
                except FileNotFoundError:
                    continue
        return found

    def evict(self) -> int:
        """Delete whole segments, oldest first, until the cache is within `max_bytes`; returns bytes freed."""
        segments = self._all_segments()
        total = sum(size for _, size in segments)
        freed = 0
        for path, size in sorted(segments, key=lambda item: _Segment(item[0].name).written_ms):
            if total - freed <= self.max_bytes:
                break
            remove_file(path)
            freed += size
        if freed:
            log.info("response cache: evicted %d bytes of oldest segments (bound %d bytes)", freed, self.max_bytes)
        return freed


def _row(entry: CacheEntry) -> dict:
    return {"key": entry.key, "body": entry.body, "prompt_tokens": entry.prompt_tokens,
            "completion_tokens": entry.completion_tokens}


def _unique_keys(table: pa.Table) -> pa.Table:
    """The table with one row per key (the first)."""
    if pc.count_distinct(table["key"]).as_py() == table.num_rows:
        return table
    seen: set[str] = set()
    keep = []
    for index, key in enumerate(table["key"].to_pylist()):
        if key not in seen:
            seen.add(key)
            keep.append(index)
    return table.take(keep)
