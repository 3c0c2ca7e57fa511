"""Target 3 of issue 13: generation inside one batch through the engine host vs in the run's process.

    VLLM_CPU_KVCACHE_SPACE=2 python bench/host_throughput.py --requests 4000

One process runs the same batch with batch_job in-process three times: engine in this process,
engine host, engine in this process again (each load outside the timed generation); prints each
run's `generation_seconds` and the ratio host / mean(in-process).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "host-throughput.json")
    args = parser.parse_args()

    from dagster import DagsterInstance

    from batch_pipeline.domain.settings import Settings
    from batch_pipeline.domain.tiny_model import build_tiny_model
    from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process
    from bench.workload import vocabulary_words, write_batch
    from resources.engine_host_client import stop_host

    model = str(build_tiny_model(REPO / "models" / "tiny-llama").resolve())
    work = Path(tempfile.mkdtemp(prefix="bench-host-"))
    batch = write_batch(work / "in.jsonl", args.requests, 32, 32, vocabulary_words(Path(model)), model)
    (work / "dagster").mkdir()
    rows = []
    with DagsterInstance.local_temp(str(work / "dagster")) as instance:
        for i, host in enumerate([False, True, False]):
            settings = Settings(home=REPO, data_dir=work / f"data-{i}", dagster_home=work / "dagster",
                                dtype="float32", max_model_len=1024, engine_host=host)
            spec = register_local_batch(settings, instance, batch, model, "bench", batch_id=f"t{i}")
            result = run_batch_in_process(settings, instance, spec.batch_id, log_level="WARNING")
            assert result.success, result.error
            rows.append({"engine": "host" if host else "in-process", "generation_seconds":
                         result.summary["generation_seconds"], "engine_load_seconds":
                         result.summary["engine_load_seconds"]})
            print(json.dumps(rows[-1]), flush=True)
            if host:
                stop_host(work / f"data-{i}" / "engines")
    inproc = [r["generation_seconds"] for r in rows if r["engine"] == "in-process"]
    summary = {"rows": rows, "host_throughput_over_in_process":
               round((sum(inproc) / len(inproc)) / rows[1]["generation_seconds"], 3)}
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
