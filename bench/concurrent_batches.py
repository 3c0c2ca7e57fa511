"""Many small batches submitted at once vs one big batch, the way users run them: through the daemon.

    python bench/concurrent_batches.py --small 20 --small-requests 200

Issue 19: twenty 200-request batches of one model, submitted at once, should finish within 1.10x the
time of one 4,000-request batch with the same requests, with the defaults. Here the production path
runs it: `vllm-batch start` (the Dagster daemon and webserver) on an embedded SQLite instance with
the default engine (the warm host); this process queues batches as `vllm-batch submit` does (the same BatchService) and
polls them until they end. The daemon launches each batch as its own run (a new process), and the
`gpu` pool admits up to VBATCH_ENGINE_HOST_CLIENTS batch steps at once, which share the one engine.

Stages, in order: a one-request batch starts the host (not timed); then, `--repeats` times, one big
batch (small*small_requests requests) and the same requests as `small` batches submitted at once.
Each stage's time runs from its first submit to the last batch of it ending (`completed`, checked
with every request answered). With `--clients 1` the same runs with one batch step at a time (the
small batches then run one after the other on the warm host), for comparison.

Prints one JSON line per stage and a summary (`small_over_big` per repeat), written to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.ports import free_port  # noqa: E402 - the repository is on the path now

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=20)
    parser.add_argument("--small-requests", type=int, default=200)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--clients", type=int, default=None,
                        help="VBATCH_ENGINE_HOST_CLIENTS (batches sharing the host; default: the setting's default).")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--shape", choices=["llama-1b", "llama-8b"], help="A Llama-shaped model (GPU runs).")
    parser.add_argument("--load-format", default=None, help="e.g. dummy: random weights from config.json.")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--keep", action="store_true", help="Keep the work folder (logs) at the end.")
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "concurrent-batches.json")
    args = parser.parse_args()

    from batch_pipeline.domain.tiny_model import build_tiny_model
    from bench.warm_batches import gpu_memory_mib
    from bench.workload import split_batch, vocabulary_words, write_batch, write_shape

    work = Path(tempfile.mkdtemp(prefix="bench-concurrent-"))
    model = str(write_shape(args.shape, work / args.shape)) if args.shape else \
        str(build_tiny_model(REPO / "models" / "tiny-llama").resolve())
    on_gpu = gpu_memory_mib() is not None
    words = vocabulary_words(Path(model))
    total = args.small * args.small_requests
    big = write_batch(work / "big.jsonl", total, args.prompt_len, args.output_len, words, model)
    smalls, warmup = split_batch(big, work, args.small, args.small_requests)

    env = {
        **os.environ,
        "VBATCH_HOME": str(REPO),
        "VBATCH_DATA_DIR": str(work / "data"),
        "DAGSTER_HOME": str(work / "dagster"),
        "VBATCH_DAGSTER_HOME": str(work / "dagster"),
        "VBATCH_CHUNK_SIZE": str(args.chunk_size),
        "VBATCH_DTYPE": "auto" if on_gpu else "float32",
        "VBATCH_MAX_MODEL_LEN": "2048" if on_gpu else "1024",
        "VBATCH_ENGINE_ARGS": json.dumps({"load_format": args.load_format} if args.load_format else {}),
        "VBATCH_INBOX_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
    }
    if args.clients is not None:
        env["VBATCH_ENGINE_HOST_CLIENTS"] = str(args.clients)
    for name in ("VBATCH_ENGINE_HOST", *(() if args.clients is not None else ("VBATCH_ENGINE_HOST_CLIENTS",))):
        env.pop(name, None)  # the defaults: the warm engine host, shared by every batch of the model
        os.environ.pop(name, None)
    os.environ.update(env)
    (work / "dagster").mkdir()
    supervisor_log = (work / "supervisor.log").open("w")
    if importlib.util.find_spec("dagster_webserver") is not None:
        command = [sys.executable, "-m", "batch_pipeline.entrypoints.cli", "start", "--port", str(free_port())]
    else:  # a staged GPU machine has no webserver: the daemon alone launches the runs
        from batch_pipeline.domain.instance import prepare_instance
        from batch_pipeline.domain.settings import Settings

        prepare_instance(Settings())
        command = [sys.executable, "-m", "dagster._daemon", "run", "-w", str(REPO / "workspace.yaml")]
    supervisor = subprocess.Popen(command, cwd=REPO, env=env, stdout=supervisor_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    results: dict = {"small": args.small, "small_requests": args.small_requests, "clients": args.clients,
                     "model": args.shape or "tiny-llama", "stages": []}
    try:
        from batch_pipeline.domain.instance import open_instance
        from batch_pipeline.domain.settings import Settings
        from batch_pipeline.entrypoints.api.service import BatchService
        from resources.engine_host_client import read_host

        settings = Settings()
        service = BatchService(settings, open_instance(settings))

        def stage(label: str, paths: list[Path], repeat: int) -> dict:
            started, started_wall = time.perf_counter(), time.time()
            ids = [service.submit_file(path, model, f"{label}-{repeat}-{path.stem}", {}).id for path in paths]
            submitted = time.perf_counter() - started
            ended: dict[str, float] = {}
            batches = {}
            deadline = time.monotonic() + args.timeout
            while len(ended) < len(ids):
                if supervisor.poll() is not None:
                    raise SystemExit(f"vllm-batch start exited ({supervisor.returncode}); see {work}/supervisor.log")
                if time.monotonic() > deadline:
                    raise SystemExit(f"{label}: {len(ids) - len(ended)} batches not finished in {args.timeout:.0f}s")
                for batch_id in ids:
                    if batch_id in ended:
                        continue
                    batch = service.describe(batch_id)
                    if batch.status in TERMINAL:
                        ended[batch_id] = time.perf_counter() - started
                        batches[batch_id] = batch
                time.sleep(0.5)
            for batch_id, batch in batches.items():
                counts = batch.request_counts
                if batch.status != "completed" or counts.completed != counts.total:
                    raise SystemExit(f"{batch_id} ended {batch.status} with {counts}; see {work}")
            host = read_host(work / "data" / "engines")
            steps = [chunk_step_facts(service.instance, batch_id) for batch_id in ids]
            spans = [run_span(service.instance, batch_id) for batch_id in ids]
            first_outputs = sorted(step["first_output_seconds"] for step in steps if step)
            row = {"label": label, "repeat": repeat, "batches": len(ids),
                   "requests": sum(b.request_counts.total for b in batches.values()),
                   "submit_seconds": round(submitted, 2), "wall_seconds": round(max(ended.values()), 2),
                   "first_batch_done_seconds": round(min(ended.values()), 2),
                   "host_pid": host["pid"] if host else None,
                   # Seconds from each batch step's start to its first finished request (sorted).
                   "first_output_seconds": first_outputs,
                   "engines_loaded_in_steps": sum(step.get("engines_loaded_in_process", 0) for step in steps if step),
                   # Where a batch's time goes, mean over the stage's batches: submit -> run start (sensor,
                   # queue, launch), run start -> end outside the generation step (process start, input,
                   # results), and the generation step itself.
                   "mean_seconds": mean_breakdown(started_wall, spans, steps)}
            results["stages"].append(row)
            print(json.dumps(row), flush=True)
            return row

        stage("warmup", [warmup], 0)
        ratios = []
        for repeat in range(args.repeats):
            one = stage("big", [big], repeat)
            many = stage("small", smalls, repeat)
            ratios.append(round(many["wall_seconds"] / one["wall_seconds"], 3))
        hosts = {row["host_pid"] for row in results["stages"]}
        results["summary"] = {"small_over_big": ratios, "engine_hosts_seen": len(hosts),
                              "big_wall_seconds": [r["wall_seconds"] for r in results["stages"] if r["label"] == "big"],
                              "small_wall_seconds": [r["wall_seconds"] for r in results["stages"] if r["label"] == "small"]}
        print(json.dumps(results["summary"]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    finally:
        import signal

        from resources.engine_host_client import stop_host

        with_children = supervisor.pid
        try:
            os.killpg(with_children, signal.SIGTERM)
            supervisor.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(with_children, signal.SIGKILL)
        stop_host(work / "data" / "engines")
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)


def run_span(instance, batch_id: str) -> tuple[float, float] | None:
    """(start, end) wall-clock times of the batch's latest run, if it ran."""
    from dagster import RunsFilter

    from batch_pipeline.domain.constants import PARTITION_TAG

    records = instance.get_run_records(RunsFilter(tags={PARTITION_TAG: batch_id}), limit=1)
    if not records or records[0].start_time is None or records[0].end_time is None:
        return None
    return records[0].start_time, records[0].end_time


def mean_breakdown(submitted: float, spans: list, steps: list[dict]) -> dict:
    """Mean seconds per batch: waiting for its run, its run outside the generation step, the step."""
    rows = [(span[0] - submitted, span[1] - span[0] - step.get("step_seconds", 0.0), step.get("step_seconds", 0.0))
            for span, step in zip(spans, steps, strict=True) if span and step]
    if not rows:
        return {}
    return {name: round(sum(row[index] for row in rows) / len(rows), 2)
            for index, name in enumerate(("to_run_start", "run_outside_step", "generation_step"))}


def chunk_step_facts(instance, batch_id: str) -> dict:
    """The metadata of the batch's latest batch_chunks materialisation ({} if none is recorded)."""
    from dagster import AssetKey, AssetRecordsFilter

    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("batch_chunks"), asset_partitions=[batch_id]), limit=1).records
    if not records:
        return {}
    metadata = records[0].asset_materialization.metadata
    return {name: value.value for name, value in metadata.items() if isinstance(value.value, (int, float))}


if __name__ == "__main__":
    main()
