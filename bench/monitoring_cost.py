"""What monitoring costs a batch: generation throughput with monitoring on vs off, alternating, same process tree.

Each repetition runs the same batch twice, once per mode, in two child processes of this one (the order
flips every repetition, so warm-up and drift fall on both sides):

* **off**: `batch_job` in-process on a fresh SQLite instance (what `vllm-batch run` does).
* **on**: the same, plus everything monitoring does while a batch runs: the exporter of `vllm-batch start`
  (its `/metrics` endpoint, polling this instance every `--poll-seconds`, default 1 s, five times more
  often than the default), vLLM's stats switched on (`disable_log_stats: false`) and writing its metrics
  to `PROMETHEUS_MULTIPROC_DIR`, and a scrape of the endpoint every second during the run.

Throughput is `batch_chunks`' generation throughput (completion tokens / generation seconds: engine load
excluded, as each child loads its own engine). Prints a table and one JSON object on the last line.

    python bench/monitoring_cost.py --requests 1000 --repetitions 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.ports import free_port  # noqa: E402 - the repository is on the path now


def child(args: argparse.Namespace) -> None:
    """One batch in this process, monitoring `args.child` ('on' or 'off'); one JSON line on stdout."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-monitoring-{args.child}-"))
    os.environ.update(VBATCH_HOME=str(ROOT), VBATCH_DATA_DIR=str(work / "data"), DAGSTER_HOME=str(work / "dagster"),
                      VBATCH_DTYPE="float32", VBATCH_ENFORCE_EAGER="true", VBATCH_MAX_MODEL_LEN="1024",
                      VBATCH_CHUNK_SIZE=str(args.chunk_size), VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
                      VLLM_LOGGING_LEVEL="WARNING")
    scrapes = 0
    stop = threading.Event()
    exporter = None
    if args.child == "on":
        os.environ.update(VBATCH_ENABLE_MONITORING="true", VBATCH_METRICS_PORT=str(free_port()),
                          VBATCH_METRICS_POLL_SECONDS=str(args.poll_seconds))
    from batch_pipeline.domain.instance import open_instance
    from batch_pipeline.domain.settings import get_settings
    from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process
    from batch_pipeline.orchestration.enabled_integrations import start_integration_services

    settings = get_settings()
    instance = open_instance(settings)
    if args.child == "on":
        # As `vllm-batch start` does before it starts the daemon: the endpoint, and the workers' environment.
        stops = start_integration_services(settings, lambda line: print(line, file=sys.stderr))
        assert stops, "the metrics endpoint did not start"
        get_settings.cache_clear()
        settings = get_settings()  # VBATCH_ENGINE_ARGS now asks vLLM for its stats
        url = f"http://127.0.0.1:{settings.metrics_port}/metrics"

        def scrape() -> None:
            nonlocal scrapes
            while not stop.wait(1.0):
                with urllib.request.urlopen(url, timeout=5) as response:
                    response.read()
                scrapes += 1

        exporter = threading.Thread(target=scrape, daemon=True)
        exporter.start()
    spec = register_local_batch(settings, instance, Path(args.input), args.model, "bench", batch_id="bench")
    run = run_batch_in_process(settings, instance, spec.batch_id)
    stop.set()
    if not run.success:
        raise SystemExit(f"batch failed: {run.error}")
    seen = ""
    if args.child == "on":
        with urllib.request.urlopen(url, timeout=5) as response:
            seen = response.read().decode()
    print(json.dumps({
        "mode": args.child, "completed": run.summary["completed"],
        "completion_tokens": run.summary["completion_tokens"],
        "generation_seconds": run.summary["generation_seconds"],
        "tokens_per_second": run.summary["completion_tokens"] / run.summary["generation_seconds"],
        "wall_seconds": run.seconds, "scrapes": scrapes,
        "engine_metrics_seen": "vllm:generation_tokens_total" in seen,
        "batch_metrics_seen": "vbatch_requests_total" in seen,
    }), flush=True)
    os._exit(0)  # the exporter's threads and the engine are done with; don't wait on them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny-llama"))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--poll-seconds", type=float, default=1.0)
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from bench.workload import vocabulary_words, write_batch

    model = Path(args.model).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-monitoring-"))
    batch = write_batch(work / "input.jsonl", args.requests, args.prompt_len, args.output_len,
                        vocabulary_words(model), str(model))
    runs: list[dict] = []
    for repetition in range(args.repetitions):
        for mode in (("off", "on") if repetition % 2 == 0 else ("on", "off")):
            command = [sys.executable, __file__, "--child", mode, "--input", str(batch), "--model", str(model),
                       "--chunk-size", str(args.chunk_size), "--poll-seconds", str(args.poll_seconds)]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["repetition"] = repetition
            runs.append(result)
            print(f"repetition {repetition} {mode:>3}: {result['tokens_per_second']:8.0f} generated tok/s "
                  f"({result['generation_seconds']:.2f} s generation, {result['scrapes']} scrapes)", flush=True)
    on = [r["tokens_per_second"] for r in runs if r["mode"] == "on"]
    off = [r["tokens_per_second"] for r in runs if r["mode"] == "off"]
    pairs = [a["tokens_per_second"] / b["tokens_per_second"]
             for a in runs if a["mode"] == "on" for b in runs if b["mode"] == "off" and b["repetition"] == a["repetition"]]
    summary = {"requests": args.requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
               "repetitions": args.repetitions, "poll_seconds": args.poll_seconds,
               "on_mean": statistics.mean(on), "off_mean": statistics.mean(off),
               "ratio_on_off": statistics.mean(on) / statistics.mean(off), "pair_ratios": pairs,
               "off_spread": (max(off) - min(off)) / statistics.mean(off), "runs": runs}
    print(f"monitoring on/off: {summary['ratio_on_off']:.3f} (pairs {', '.join(f'{p:.3f}' for p in pairs)}; "
          f"spread of the off runs {summary['off_spread']:.1%})")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
