"""`GET /v1/files` at 10,000 files: latency of the whole list and of pages, in-process.

    python bench/files_list.py --files 10000 --repeats 200

Creates FILES file records of one key (uploads, and a tenth of them batch output files) in a
throwaway data folder through the file store itself (what an upload ends with), then
serves the API app in-process (Starlette's test client: routing, the key check, validation and JSON
encoding, no sockets) and times each kind of request REPEATS times: the default request (no `limit`:
all 10,000 on one page, as the official client's `files.list()` asks first), pages of 100
from the start, from a cursor halfway down the list and in ascending order, and a `purpose` filter.
Prints one JSON object: per request, p50/p99/max ms and the number of files on the page; also the
first request after the server started (the store reads every record once). The figures move with
whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from starlette.testclient import TestClient  # noqa: E402

from batch_pipeline.domain.settings import Settings  # noqa: E402
from batch_pipeline.domain.tenancy import key_fingerprint  # noqa: E402
from batch_pipeline.entrypoints.api.app import create_app  # noqa: E402
from batch_pipeline.entrypoints.api.files import FileStore  # noqa: E402

KEY = "bench-files-key-3c8e1a"


def make_files(store: FileStore, count: int) -> None:
    """`count` file records of KEY: uploads, and a batch's output file in ten."""
    owner = key_fingerprint(KEY)
    results = store.root.parent / "results"
    results.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        if index % 10 == 9:
            output = results / f"batch_{index}.jsonl"
            output.write_text("{}\n")
            store.register_result(f"batch_bench{index:06d}", "output", output, owner)
            continue
        upload = store.upload_path()
        upload.write_text('{"custom_id": "a"}\n')
        store.adopt(upload, f"in-{index}.jsonl", "batch", owner)


def timed(http: TestClient, params: dict[str, str | int], repeats: int) -> dict[str, float | int]:
    """p50/p99/max ms of `repeats` GET /v1/files with `params`, and the page's length."""
    latencies = []
    length = 0
    for _ in range(repeats):
        started = time.perf_counter()
        answer = http.get("/v1/files", params=params)
        latencies.append((time.perf_counter() - started) * 1000)
        answer.raise_for_status()
        length = len(answer.json()["data"])
    latencies.sort()
    return {"files_on_page": length, "p50_ms": round(statistics.median(latencies), 1),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
            "max_ms": round(latencies[-1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        settings = Settings(home=REPO, data_dir=root / "data", dagster_home=root / "dagster", api_keys=KEY)
        started = time.perf_counter()
        make_files(FileStore(settings.resolved_data_dir), args.files)
        created_s = time.perf_counter() - started
        with TestClient(create_app(settings), headers={"Authorization": f"Bearer {KEY}"}) as http:
            started = time.perf_counter()
            first = http.get("/v1/files", params={"limit": 100})
            first_ms = (time.perf_counter() - started) * 1000
            first.raise_for_status()
            every = http.get("/v1/files").json()["data"]
            middle = every[len(every) // 2]["id"]
            report = {
                "files": args.files, "repeats": args.repeats,
                "create_s": round(created_s, 1), "first_request_after_start_ms": round(first_ms, 1),
                "requests": {
                    "default (every file)": timed(http, {}, args.repeats),
                    "limit=100": timed(http, {"limit": 100}, args.repeats),
                    "limit=100, after the middle": timed(http, {"limit": 100, "after": middle}, args.repeats),
                    "limit=100, order=asc": timed(http, {"limit": 100, "order": "asc"}, args.repeats),
                    "limit=100, purpose=batch_output": timed(http, {"limit": 100, "purpose": "batch_output"},
                                                             args.repeats),
                },
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
