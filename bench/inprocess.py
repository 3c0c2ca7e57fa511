"""Stage A of the benchmark, in one process with one engine: raw vLLM (the ceiling), then the pipeline.

The engine is loaded once; the ceiling is `LLM.generate` over every request at once, and the
pipeline is `batch_job` run in-process on a real SQLite instance, with the same engine, at each
chunk size. Prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ceiling(llm, rows) -> float:
    from vllm import SamplingParams

    conversations = [messages for messages, _ in rows]
    params = [SamplingParams(max_tokens=m, ignore_eos=True, temperature=0.8) for _, m in rows]
    started = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    assert sum(len(o.outputs[0].token_ids) for o in outputs) == sum(m for _, m in rows)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--chunk-sizes", default="256")
    parser.add_argument("--engine-args", default="{}")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()

    from dagster import DagsterInstance

    from batch_pipeline.domain.settings import Settings
    from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process
    from bench.workload import read_batch
    from resources.vllm_engine import VLLMEngine

    work = Path(tempfile.mkdtemp(prefix="bench-inproc-"))
    base = dict(home=Path(__file__).resolve().parents[1], data_dir=work / "data", dagster_home=work / "dagster",
                dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                engine_args=args.engine_args, keep_engine_loaded=True)
    engine = VLLMEngine(dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                        engine_args=args.engine_args, keep_loaded=True)
    rows = read_batch(args.input)
    started = time.perf_counter()
    loaded = engine.load(args.model)
    load_seconds = time.perf_counter() - started
    ceiling(loaded.llm, rows[:64])  # warm-up: first-call costs belong to neither side

    result = {"load_seconds": load_seconds, "requests": len(rows), "completion_tokens": sum(m for _, m in rows),
              "ceiling_seconds": [], "pipeline": []}
    result["ceiling_seconds"].append(ceiling(loaded.llm, rows))
    (work / "dagster").mkdir(parents=True)
    with DagsterInstance.local_temp(str(work / "dagster")) as instance:
        for size in [int(s) for s in args.chunk_sizes.split(",")]:
            settings = Settings(**base, chunk_size=size)
            spec = register_local_batch(settings, instance, args.input, args.model, "bench", batch_id=f"bench-{size}",
                                        chunk_size=size)
            run = run_batch_in_process(settings, instance, spec.batch_id)
            if not run.success:
                raise SystemExit(f"pipeline failed: {run.error}")
            assert run.summary["completed"] == len(rows), run.summary
            result["prompt_tokens"] = run.summary["prompt_tokens"]
            result["pipeline"].append({"chunk_size": size, "seconds": run.seconds,
                                       "generation_seconds": run.summary["generation_seconds"],
                                       "completion_tokens": run.summary["completion_tokens"]})
    result["ceiling_seconds"].append(ceiling(loaded.llm, rows))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    VLLMEngine.release()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
