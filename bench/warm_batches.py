"""Back-to-back batches: the warm engine host vs an engine loaded per batch, and many small batches vs one big.

    python bench/warm_batches.py --small 20 --small-requests 200

One process runs batch_job in-process (run_batch_in_process, a real SQLite instance) for:
  cold    two batches with the engine in the run's process (host off, released after each batch,
          as every daemon-launched run does today): time to first output of each;
  warm    the engine host on: a one-request batch starts the host, then one batch of
          small*small_requests requests, then `small` batches of small_requests requests each
          (the same requests), one after the other; time to first output and wall of each.
Time to first output is batch_chunks' `first_output_seconds`: from the step's start to the first
finished request. What this does not measure: the daemon's run launch (a new process per run,
imports included) and batches of one model sharing the engine at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=20)
    parser.add_argument("--small-requests", type=int, default=200)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--cold", type=int, default=2, help="Batches with a per-batch engine (0 skips).")
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "warm-batches.json")
    args = parser.parse_args()

    from dagster import DagsterInstance

    from batch_pipeline.local_run import register_local_batch, run_batch_in_process
    from batch_pipeline.settings import Settings
    from batch_pipeline.tiny_model import build_tiny_model
    from bench.workload import vocabulary_words, write_batch
    from resources.engine_host import stop_host

    model = str(build_tiny_model(REPO / "models" / "tiny-llama").resolve())
    work = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    words = vocabulary_words(Path(model))
    total = args.small * args.small_requests
    big = write_batch(work / "big.jsonl", total, args.prompt_len, args.output_len, words, model)
    lines = big.read_text().splitlines(keepends=True)
    smalls = []
    for i in range(args.small):
        path = work / f"small-{i}.jsonl"
        path.write_text("".join(lines[i * args.small_requests:(i + 1) * args.small_requests]))
        smalls.append(path)
    warmup = work / "warmup.jsonl"
    warmup.write_text(lines[0])
    results: dict = {"small": args.small, "small_requests": args.small_requests, "batches": []}

    def run(settings: Settings, instance, path: Path, label: str) -> dict:
        spec = register_local_batch(settings, instance, path, model, "bench", batch_id=f"{label}-{path.stem}")
        started = time.perf_counter()
        result = run_batch_in_process(settings, instance, spec.batch_id, log_level="WARNING")
        assert result.success, result.error
        row = {"label": label, "batch": path.stem, "requests": result.summary["total"],
               "wall_seconds": round(time.perf_counter() - started, 2),
               "first_output_seconds": result.summary["first_output_seconds"],
               "engine_load_seconds": result.summary["engine_load_seconds"],
               "generation_seconds": result.summary["generation_seconds"]}
        results["batches"].append(row)
        print(json.dumps(row), flush=True)
        return row

    common = {"home": REPO, "dtype": "float32", "max_model_len": 1024, "chunk_size": 256}
    (work / "dagster").mkdir()
    with DagsterInstance.local_temp(str(work / "dagster")) as instance:
        cold = Settings(data_dir=work / "cold", dagster_home=work / "dagster", **common)
        for i in range(args.cold):
            run(cold, instance, smalls[i], "cold")
        warm = Settings(data_dir=work / "warm", dagster_home=work / "dagster", engine_host=True, **common)
        run(warm, instance, warmup, "warm-start")
        big_row = run(warm, instance, big, "warm-big")
        small_rows = [run(warm, instance, path, "warm-small") for path in smalls]
        stop_host(work / "warm" / "engines")
    small_wall = sum(r["wall_seconds"] for r in small_rows)
    results["summary"] = {
        "one_big_wall_seconds": big_row["wall_seconds"],
        "small_batches_wall_seconds": round(small_wall, 2),
        "small_over_big": round(small_wall / big_row["wall_seconds"], 3),
        "warm_first_output_seconds_max": max(r["first_output_seconds"] for r in small_rows),
        "warm_first_output_seconds_mean": round(sum(r["first_output_seconds"] for r in small_rows) / len(small_rows), 3),
        "cold_first_output_seconds": [r["first_output_seconds"] for r in results["batches"] if r["label"] == "cold"],
    }
    print(json.dumps(results["summary"], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
