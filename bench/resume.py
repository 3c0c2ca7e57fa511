"""Resume after a crash: SIGKILL `vllm-batch run` when half the chunks are written, run it again.

    python bench/resume.py --requests 2000 --chunk-size 100

Reports how many chunks the re-run skipped and recomputed, how many requests it redid beyond the
missing chunks (the target: at most one chunk's worth), and the wall time of each attempt.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--chunk-size", type=int, default=100)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--model", default=str(REPO / "models" / "tiny-llama"))
    args = parser.parse_args()

    from bench.workload import vocabulary_words, write_batch

    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    batch = write_batch(work / "in.jsonl", args.requests, 32, args.output_len, vocabulary_words(Path(args.model)), "bench")
    env = dict(os.environ, VBATCH_HOME=str(REPO), VBATCH_DATA_DIR=str(work / "data"),
               DAGSTER_HOME=str(work / "dagster"), VBATCH_CHUNK_SIZE=str(args.chunk_size),
               VLLM_LOGGING_LEVEL="WARNING")
    if not os.path.exists("/usr/bin/nvidia-smi"):
        env.update(VBATCH_DTYPE="float32", VBATCH_ENFORCE_EAGER="true", VLLM_CPU_KVCACHE_SPACE="2")
    cmd = [sys.executable, "-m", "batch_pipeline.entrypoints.cli", "run", str(batch), "--model", args.model,
           "--model-name", "bench", "--batch-id", "resume", "--json"]
    chunks = work / "data" / "batches" / "resume" / "chunks"
    total = -(-args.requests // args.chunk_size)

    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while proc.poll() is None and len(list(chunks.glob("chunk-*.parquet")) if chunks.is_dir() else []) < total // 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = time.perf_counter() - started
    kept = len(list(chunks.glob("chunk-*.parquet")))

    started = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout
    rerun = time.perf_counter() - started
    summary = json.loads(out[out.index("{"):])
    redone = summary["chunks_run"] - (total - kept)
    print(f"{args.requests} requests in {total} chunks of {args.chunk_size}")
    print(f"first attempt killed after {killed_after:.1f}s with {kept} chunks written")
    print(f"re-run: {rerun:.1f}s wall ({summary['engine_load_seconds']:.1f}s engine load, "
          f"{summary['generation_seconds']:.1f}s generation); skipped {summary['chunks_resumed']} chunks, "
          f"computed {summary['chunks_run']}; chunks redone beyond the missing ones: {redone}")
    print(f"output lines: {summary['completed']} of {args.requests}")


if __name__ == "__main__":
    main()
