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

With `--swap-check` (on a GPU), it also measures target 5: the GPU memory in use (nvidia-smi) while the
host holds model A, at the moment the batch for model B starts loading (A must be gone first), and
after the host has been idle for `--idle-seconds` (the host must have exited and freed it).

    python bench/warm_batches.py --shape llama-1b --load-format dummy --prompt-len 128 --output-len 128 --swap-check
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
    parser.add_argument("--shape", choices=["llama-1b", "llama-8b"], help="A Llama-shaped model (GPU runs).")
    parser.add_argument("--load-format", default=None, help="e.g. dummy: random weights from config.json.")
    parser.add_argument("--swap-check", action="store_true", help="Measure GPU memory across a model swap and idle.")
    parser.add_argument("--idle-seconds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "warm-batches.json")
    args = parser.parse_args()

    from dagster import DagsterInstance

    from batch_pipeline.domain.settings import Settings
    from batch_pipeline.domain.tiny_model import build_tiny_model
    from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process
    from bench.workload import split_batch, vocabulary_words, write_batch, write_shape
    from resources.engine_host_client import stop_host

    work = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    if args.shape:
        model = str(write_shape(args.shape, work / args.shape))
    else:
        model = str(build_tiny_model(REPO / "models" / "tiny-llama").resolve())
    on_gpu = gpu_memory_mib() is not None
    words = vocabulary_words(Path(model))
    total = args.small * args.small_requests
    big = write_batch(work / "big.jsonl", total, args.prompt_len, args.output_len, words, model)
    smalls, warmup = split_batch(big, work, args.small, args.small_requests)
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

    common = {"home": REPO, "dtype": "auto" if on_gpu else "float32", "max_model_len": 1024 if not on_gpu else 2048,
              "chunk_size": 256, "enforce_eager": not on_gpu,
              "engine_args": json.dumps({"load_format": args.load_format} if args.load_format else {})}
    (work / "dagster").mkdir()
    with DagsterInstance.local_temp(str(work / "dagster")) as instance:
        cold = Settings(data_dir=work / "cold", dagster_home=work / "dagster", **common)
        for i in range(args.cold):
            run(cold, instance, smalls[i], "cold")
        warm = Settings(data_dir=work / "warm", dagster_home=work / "dagster", engine_host=True, **common)
        run(warm, instance, warmup, "warm-start")
        big_row = run(warm, instance, big, "warm-big")
        small_rows = [run(warm, instance, path, "warm-small") for path in smalls]
        if args.swap_check:
            print(json.dumps({"warm_before_swap": [r["first_output_seconds"] for r in small_rows]}), flush=True)
            try:
                results["swap"] = swap_check(args, work, warm, instance, model, warmup, run)
            except Exception as exc:  # the warm figures above still count
                results["swap"] = {"error": repr(exc)}
        stop_host(work / "warm" / "engines")
    small_wall = sum(r["wall_seconds"] for r in small_rows)
    results["summary"] = {
        "one_big_wall_seconds": big_row["wall_seconds"],
        "small_batches_wall_seconds": round(small_wall, 2),
        "small_over_big": round(small_wall / big_row["wall_seconds"], 3),
        "warm_first_output_seconds_max": max(r["first_output_seconds"] for r in small_rows),
        "warm_first_output_seconds_mean": round(sum(r["first_output_seconds"] for r in small_rows) / len(small_rows), 3),
        "cold_first_output_seconds": [r["first_output_seconds"] for r in results["batches"] if r["label"] == "cold"],
        "swap": results.get("swap"),
    }
    print(json.dumps(results["summary"], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


def gpu_memory_mib() -> int | None:
    """GPU memory in use on every device (nvidia-smi), or None without a GPU."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True)
    return sum(int(v) for v in out.stdout.split()) if out.returncode == 0 else None


def swap_check(args, work: Path, warm, instance, model: str, warmup: Path, run) -> dict:
    """Target 5: model B's load starts only after model A's memory is free; an idle host frees it too."""
    import threading

    from bench.workload import write_shape
    from resources.engine_host_client import read_host

    baseline = gpu_memory_mib()
    if args.shape:
        other = write_shape(args.shape, work / "other-model")
    else:  # the tiny model under another folder: another engine as far as the host can tell
        import shutil

        other = Path(shutil.copytree(model, work / "other-model"))
    # Another model is another engine (another folder): the host of A must stop before B loads.
    other_batch = work / "other.jsonl"
    other_batch.write_text(warmup.read_text().replace(json.dumps(model), json.dumps(str(other))))
    holding_a = gpu_memory_mib()
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        start = time.perf_counter()
        while not done.is_set():
            value = gpu_memory_mib()
            if value is not None:
                samples.append((round(time.perf_counter() - start, 2), value))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    spec_model = str(other)
    from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process

    spec = register_local_batch(warm, instance, other_batch, spec_model, "bench", batch_id="swap-other")
    result = run_batch_in_process(warm, instance, spec.batch_id, log_level="WARNING")
    done.set()
    sampler.join()
    holding_b = gpu_memory_mib()
    lowest = min(value for _, value in samples) if samples else None
    # Idle: the host gives the GPU back after idle_seconds without a client.
    idle_warm = warm.model_copy(update={"engine_idle_seconds": args.idle_seconds})
    spec = register_local_batch(idle_warm, instance, warmup, model, "bench", batch_id="swap-idle")
    run_batch_in_process(idle_warm, instance, spec.batch_id, log_level="WARNING")
    after_batch = gpu_memory_mib()
    deadline = time.perf_counter() + args.idle_seconds + 120
    while read_host(work / "warm" / "engines") is not None and time.perf_counter() < deadline:
        time.sleep(1)
    time.sleep(3)
    after_idle = gpu_memory_mib()
    return {"baseline_mib": baseline, "holding_a_mib": holding_a, "lowest_during_swap_mib": lowest,
            "holding_b_mib": holding_b, "swap_success": result.success,
            "after_idle_batch_mib": after_batch, "after_idle_seconds_mib": after_idle,
            "idle_seconds": args.idle_seconds, "samples_during_swap": samples[::5]}


if __name__ == "__main__":
    main()
