"""The finishing estimate at submit against the real finishing time, on a queue of five batches (issue 21).

    python bench/estimate_accuracy.py --requests 100,300,200,400,150

The production path: the Dagster daemon on an embedded SQLite instance, the default engine (the warm
host, shared by batches of one model), batches queued as `vllm-batch submit` queues them (the same
BatchService). First one warm-up batch runs alone, so that the model has one finished batch on record
(and the host is loaded); then the five batches are submitted back to back, and each one's estimate
at submit (`completion_estimate.expected_completed_at`) is compared with its real `completed_at`, both
counted from its `created_at`. Requests are chat requests of mixed lengths (prompts and outputs drawn
from [len/4, 2*len] tokens, `ignore_eos`, as bench/workload.py writes them).

Prints one JSON line per batch and a summary (the largest error), written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", default="100,300,200,400,150", help="Requests of each queued batch.")
    parser.add_argument("--warmup-requests", type=int, default=200)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "estimate-accuracy.json")
    args = parser.parse_args()

    from batch_pipeline.domain.instance import open_instance, prepare_instance
    from batch_pipeline.domain.settings import Settings
    from batch_pipeline.domain.tiny_model import build_tiny_model
    from bench.workload import vocabulary_words, write_batch

    work = Path(tempfile.mkdtemp(prefix="bench-estimate-"))
    model = str(build_tiny_model(REPO / "models" / "tiny-llama").resolve())
    words = vocabulary_words(Path(model))
    sizes = [int(n) for n in args.requests.split(",")]
    files = [write_batch(work / f"q{i}.jsonl", n, args.prompt_len, args.output_len, words, model, mixed=True, seed=i)
             for i, n in enumerate(sizes)]
    warmup = write_batch(work / "warmup.jsonl", args.warmup_requests, args.prompt_len, args.output_len, words, model,
                         mixed=True, seed=99)
    env = {**os.environ, "VBATCH_HOME": str(REPO), "VBATCH_DATA_DIR": str(work / "data"),
           "DAGSTER_HOME": str(work / "dagster"), "VBATCH_DAGSTER_HOME": str(work / "dagster"),
           "VBATCH_DTYPE": "float32", "VBATCH_MAX_MODEL_LEN": "1024", "VBATCH_INBOX_ENABLED": "false",
           "VBATCH_ENGINE_IDLE_SECONDS": "120", "PYTHONUNBUFFERED": "1",
           # The CPU build reserves VLLM_CPU_KVCACHE_SPACE GiB, or 90% of the memory without it.
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    for name in ("VBATCH_ENGINE_HOST", "VBATCH_ENGINE_HOST_CLIENTS"):  # the defaults: a warm, shared host
        env.pop(name, None)
        os.environ.pop(name, None)
    os.environ.update(env)
    (work / "dagster").mkdir()
    settings = Settings()
    prepare_instance(settings)
    log = (work / "daemon.log").open("w")
    daemon = subprocess.Popen([sys.executable, "-m", "dagster._daemon", "run", "-w", str(REPO / "workspace.yaml")],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from batch_pipeline.entrypoints.api.service import BatchService

        service = BatchService(settings, open_instance(settings))

        def wait(ids: list[str]) -> dict:
            ended: dict = {}
            deadline = time.monotonic() + args.timeout
            while len(ended) < len(ids):
                if daemon.poll() is not None:
                    raise SystemExit(f"the daemon exited ({daemon.returncode}); see {work}/daemon.log")
                if time.monotonic() > deadline:
                    raise SystemExit(f"{len(ids) - len(ended)} batches not finished in {args.timeout:.0f}s; see {work}")
                for batch_id in ids:
                    batch = service.describe(batch_id) if batch_id not in ended else None
                    if batch is not None and batch.status in TERMINAL:
                        if batch.status != "completed":
                            raise SystemExit(f"{batch_id} ended {batch.status}; see {work}")
                        ended[batch_id] = batch
                time.sleep(0.5)
            return ended

        warm = service.submit_file(warmup, model, "warmup", {})
        print(json.dumps({"warmup": warm.completion_estimate.model_dump()}), flush=True)
        wait(["warmup"])
        submitted = [service.submit_file(path, model, f"queued-{i}", {}) for i, path in enumerate(files)]
        ended = wait([batch.id for batch in submitted])
        rows = []
        for batch in submitted:
            estimate = batch.completion_estimate
            done = ended[batch.id]
            real = done.completed_at - batch.created_at
            expected = estimate.expected_completed_at - batch.created_at if estimate.expected_completed_at else None
            row = {"batch": batch.id, "requests": done.request_counts.total, "output_tokens": done.usage.output_tokens,
                   "queued_ahead": estimate.queued_ahead, "estimated_seconds": expected, "real_seconds": real,
                   "error": round(expected / real - 1, 3) if expected is not None and real else None,
                   "tokens_per_second_used": estimate.tokens_per_second, "reason": estimate.reason}
            rows.append(row)
            print(json.dumps(row), flush=True)
        errors = [abs(row["error"]) for row in rows if row["error"] is not None]
        summary = {"max_abs_error": max(errors) if errors else None, "within_25_percent": sum(e <= 0.25 for e in errors),
                   "batches": len(rows), "cpus": os.cpu_count()}
        print(json.dumps(summary), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "batches": rows,
                                        "summary": summary}, indent=2))
    finally:
        from resources.engine_host_client import stop_hosts

        try:
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(daemon.pid, signal.SIGKILL)
        stop_hosts(work / "data" / "engines")
        print(f"work folder: {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
