"""The response cache (issue 21): a greedy batch, then the same batch with some lines changed, re-submitted.

    python bench/response_cache.py --requests 10000 --changed 500 --max-tokens 16

Both runs are `vllm-batch run` processes on one data folder with VBATCH_RESPONSE_CACHE=true. The
changed lines are spread at random over the file (the worst case for whole chunks answered before the
engine). Reports each run's generation time (engine load excluded: the chunks through the engine, with
their cache lookups and stores, plus the chunks answered before any engine loaded), the lines answered
from the cache and the ratio; the target is a second run at most 1/8 of the first. A third run of the
unchanged file shows an all-cached batch: no engine loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_lines(path: Path, prompts: list[str], max_tokens: int) -> Path:
    """Greedy chat requests (cacheable), fixed output length."""
    with path.open("w") as out:
        for i, prompt in enumerate(prompts):
            body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}
            out.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": body}) + "\n")
    return path


def run(cmd: list[str], env: dict, batch_id: str) -> dict:
    started = time.perf_counter()
    out = subprocess.run([*cmd, "--batch-id", batch_id], env=env, cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    summary = json.loads(out[out.index("{"):])
    summary["wall"] = time.perf_counter() - started
    summary["generation"] = summary["generation_seconds"] + summary.get("cache_seconds", 0.0)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--changed", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--model", default=str(REPO / "models" / "tiny-llama"))
    args = parser.parse_args()

    from bench.workload import vocabulary_words

    rnd = random.Random(0)
    words = vocabulary_words(Path(args.model))
    prompts = [" ".join(rnd.choice(words) for _ in range(args.prompt_words)) for _ in range(args.requests)]
    work = Path(tempfile.mkdtemp(prefix="bench-response-cache-"))
    first_file = write_lines(work / "first.jsonl", prompts, args.max_tokens)
    for index in rnd.sample(range(args.requests), args.changed):
        prompts[index] += " " + rnd.choice(words)
    second_file = write_lines(work / "second.jsonl", prompts, args.max_tokens)

    env = dict(os.environ, VBATCH_HOME=str(REPO), VBATCH_DATA_DIR=str(work / "data"),
               DAGSTER_HOME=str(work / "dagster"), VBATCH_RESPONSE_CACHE="true", VLLM_LOGGING_LEVEL="WARNING")
    if not os.path.exists("/usr/bin/nvidia-smi"):
        env.update(VBATCH_DTYPE="float32", VBATCH_ENFORCE_EAGER="true", VLLM_CPU_KVCACHE_SPACE="2")

    def command(path: Path) -> list[str]:
        return [sys.executable, "-m", "batch_pipeline.entrypoints.cli", "run", str(path), "--model", args.model,
                "--model-name", "bench", "--json"]

    first = run(command(first_file), env, "first")
    second = run(command(second_file), env, "second")
    again = run(command(first_file), env, "again")
    cache_bytes = sum(f.stat().st_size for f in (work / "data" / "response-cache").rglob("*.parquet"))
    print(f"{args.requests} greedy requests × {args.max_tokens} tokens; second run: {args.changed} lines changed")
    for name, summary in (("first", first), ("second", second), ("unchanged again", again)):
        print(f"{name:>16}: generation {summary['generation']:.2f}s (through the engine "
              f"{summary['generation_seconds']:.2f}s, whole chunks from the cache {summary.get('cache_seconds', 0):.2f}s), "
              f"engine load {summary['engine_load_seconds']:.1f}s, engines loaded {summary['engines_loaded_in_process']}, "
              f"from the cache {summary['from_cache']} of {summary['completed']}, wall {summary['wall']:.1f}s")
    ratio = second["generation"] / first["generation"]
    print(f"second / first generation: {ratio:.3f} (target <= 0.125); cache on disk: {cache_bytes / 1e6:.1f} MB")
    print(json.dumps({"first": first, "second": second, "again": again, "ratio": ratio, "cache_bytes": cache_bytes},
                     default=str))


if __name__ == "__main__":
    main()
