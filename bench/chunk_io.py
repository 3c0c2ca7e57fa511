"""Chunk files on a local data folder: atomic write, listing and read through resources/storage.py.

    python bench/chunk_io.py            # from a checkout's root: that checkout's storage code is timed

Prints the milliseconds per chunk (256 rows) written with `atomic_path` (fsync + rename), the time of
one `finished_chunks()` listing of 300 chunks, and the milliseconds per chunk read. Used to check that
the object-store data root left the local path as fast as before (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

sys.path.insert(0, ".")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import resources.storage as storage  # noqa: E402

CHUNKS = 300


def main() -> None:
    rows = [{"line": i, "id": f"batch_req_{i}", "custom_id": f"c{i}", "response": '{"x":"' + "y" * 400 + '"}',
             "error": None} for i in range(256)]
    table = pa.Table.from_pylist(rows)
    read = getattr(storage, "read_parquet", pq.read_table)  # older checkouts read with pyarrow directly
    with tempfile.TemporaryDirectory() as folder:
        paths = storage.BatchStorage(data_dir=folder).batch("bench")
        started = time.perf_counter()
        for index in range(CHUNKS):
            with storage.atomic_path(paths.chunk(index)) as tmp:
                pq.write_table(table, tmp)
        written = time.perf_counter()
        assert len(paths.finished_chunks()) == CHUNKS
        listed = time.perf_counter()
        for index in range(CHUNKS):
            read(paths.chunk(index))
        done = time.perf_counter()
    print(json.dumps({"write_ms_per_chunk": round((written - started) / CHUNKS * 1000, 3),
                      "list_ms": round((listed - written) * 1000, 3),
                      "read_ms_per_chunk": round((done - listed) / CHUNKS * 1000, 3)}))


if __name__ == "__main__":
    main()
