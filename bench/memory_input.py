"""Memory of validating and chunking a large batch file: batch_input vs loading the file whole.

    python bench/memory_input.py --lines 1000000

Both sides run as children of this process on the same generated file and report their peak RSS
(ru_maxrss): the baseline parses every line into a list of dicts, as a script that reads the file
whole does; the pipeline side materialises the `batch_input` asset on a real SQLite instance.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_file(path: Path, lines: int) -> None:
    with path.open("w") as out:
        for i in range(lines):
            body = {"model": "m", "max_tokens": 64, "temperature": 0,
                    "messages": [{"role": "system", "content": "You label product reviews."},
                                 {"role": "user", "content": f"Review {i}: the product arrived late but works well."}]}
            out.write(json.dumps({"custom_id": f"review-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": body}) + "\n")


def baseline(path: Path) -> dict:
    started = time.perf_counter()
    with path.open() as handle:
        requests = [json.loads(line) for line in handle]
    return {"lines": len(requests), "seconds": time.perf_counter() - started}


def pipeline(path: Path) -> dict:
    from dagster import DagsterInstance, materialize

    from assets.batch_input import batch_input
    from batch_pipeline.domain.intake import register
    from batch_pipeline.domain.models import ServedModel
    from batch_pipeline.domain.settings import Settings
    from resources.storage import BatchStorage

    work = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    (work / "dagster").mkdir()
    storage = BatchStorage(data_dir=str(work / "data"))
    with DagsterInstance.local_temp(str(work / "dagster")) as instance:
        settings = Settings(data_dir=work / "data", chunk_size=256)
        register(settings, instance, path, ServedModel("m", "m"), source="bench", batch_id="mem")
        started = time.perf_counter()
        result = materialize([batch_input], partition_key="mem", resources={"storage": storage}, instance=instance)
        seconds = time.perf_counter() - started
    meta = result.asset_materializations_for_node("batch_input")[0].metadata
    return {"lines": meta["valid_requests"].value + meta["invalid_lines"].value, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--side", choices=["baseline", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = (baseline if args.side == "baseline" else pipeline)(args.file)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    path = Path(tempfile.mkdtemp(prefix="bench-mem-")) / "big.jsonl"
    make_file(path, args.lines)
    size = path.stat().st_size / 2**20
    results = {}
    for side in ("baseline", "pipeline"):
        out = subprocess.run([sys.executable, __file__, "--side", side, "--file", str(path)], capture_output=True,
                             text=True, check=True, cwd=REPO).stdout
        results[side] = json.loads(out.strip().splitlines()[-1])
    b, p = results["baseline"], results["pipeline"]
    print(f"{args.lines} lines, {size:.0f} MiB file")
    print("| side | peak RSS (MiB) | seconds | lines/s |\n|---|---|---|---|")
    for name, r in (("load the file whole (json.loads per line)", b), ("batch_input (stream, validate, parquet)", p)):
        print(f"| {name} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} | {r['lines'] / r['seconds']:.0f} |")
    print(f"pipeline / baseline peak RSS = {p['peak_rss_mib'] / b['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
