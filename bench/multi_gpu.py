"""Several GPUs of one machine: one batch on one GPU vs the same batch over two (data parallel) vs two batches at once.

    python bench/multi_gpu.py --shape llama-1b --load-format dummy            # 2 GPUs, 10,000 requests
    python bench/multi_gpu.py --requests 64 --chunk-size 8                    # CPU smoke test: two CPU "devices"

Three stages, each `python -m batch_pipeline.entrypoints.cli run` in child processes of this one, on the same machine
and the same input, one stage after the other:
  a  the whole batch on one GPU (VBATCH_GPUS=1);
  b  the same batch over --gpus GPUs: one engine per GPU, the chunks shared among them (data parallel);
  c  the batch cut in --gpus equal parts, each its own `run` at the same moment, each on its own GPU
     (VBATCH_ENGINES_PER_BATCH=1: the slots keep them apart).
Prints one JSON object: per stage the wall time, the engine load, the output tokens per second end to end and
during generation, and the ratios of b and c against a.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run_bench import platform_info, run_measured  # noqa: E402
from bench.workload import vocabulary_words, write_batch, write_shape  # noqa: E402


def run_batch(batch: Path, model: str, work: Path, name: str, env: dict, out: Path) -> dict:
    """One `vllm-batch run` in a child process; its summary plus the wall time seen from here."""
    env = dict(env, VBATCH_DATA_DIR=str(work / "data"), DAGSTER_HOME=str(work / f"dagster-{name}"))
    started = time.perf_counter()
    seconds, rss, stdout = run_measured(
        [sys.executable, "-m", "batch_pipeline.entrypoints.cli", "run", str(batch), "--model", model, "--model-name", "bench",
         "--batch-id", name, "--json"], env, out / f"{work.name}-{name}.log")
    summary = json.loads(stdout[stdout.rfind("\n{\n") + 1:])  # vLLM may log to stdout before the summary
    return {"name": name, "started": started, "ended": started + seconds, "wall_seconds": seconds,
            "peak_rss_mb": rss, "summary": summary}


def stage_figures(runs: list[dict]) -> dict:
    """Throughputs of one stage: end to end over the stage's wall time, and over its generation time."""
    wall = max(r["ended"] for r in runs) - min(r["started"] for r in runs)
    tokens = sum(r["summary"]["completion_tokens"] for r in runs)
    # Concurrent runs generate at the same time: the stage generated for as long as the longest of them.
    generation = max(r["summary"]["generation_seconds"] for r in runs)
    return {
        "runs": len(runs),
        "requests": sum(r["summary"]["completed"] for r in runs),
        "failed": sum(r["summary"]["failed"] for r in runs),
        "completion_tokens": tokens,
        "wall_seconds": round(wall, 2),
        "generation_seconds": round(generation, 2),
        "engine_load_seconds": [r["summary"]["engine_load_seconds"] for r in runs],
        "engines": [[(e["slot"], e["devices"], e.get("chunks")) for e in r["summary"].get("engines", [])]
                    for r in runs],
        "output_tokens_per_second_end_to_end": round(tokens / wall, 1),
        "output_tokens_per_second_generation": round(tokens / generation, 1) if generation else None,
    }


def split_file(batch: Path, parts: int, work: Path) -> list[Path]:
    """The batch cut in `parts` consecutive, equal parts (the same requests as the whole)."""
    lines = batch.read_text().splitlines(keepends=True)
    size = -(-len(lines) // parts)
    paths = []
    for part in range(parts):
        path = work / f"part-{part}.jsonl"
        path.write_text("".join(lines[part * size:(part + 1) * size]))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="A model folder (default: the tiny test model).")
    parser.add_argument("--shape", choices=["llama-1b", "llama-8b"], help="Build a Llama-shaped folder instead.")
    parser.add_argument("--load-format", default=None, help="e.g. dummy: random weights from config.json.")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--gpus", type=int, default=2, help="GPUs (or CPU devices) for stages b and c.")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--stages", default="abc")
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "multi-gpu")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-multi-gpu-"))
    if args.shape:
        model = str(write_shape(args.shape, work / args.shape))
    else:
        from batch_pipeline.domain.tiny_model import build_tiny_model

        model = str(Path(args.model or build_tiny_model(REPO / "models" / "tiny-llama")).resolve())
    on_cpu = not shutil.which("nvidia-smi")
    batch = write_batch(work / "input.jsonl", args.requests, args.prompt_len, args.output_len,
                        vocabulary_words(Path(model)), "bench")
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", PYTHONUNBUFFERED="1", VBATCH_HOME=str(REPO),
               VBATCH_MAX_MODEL_LEN=str(args.max_model_len), VBATCH_CHUNK_SIZE=str(args.chunk_size),
               VBATCH_ENGINE_ARGS=json.dumps({"load_format": args.load_format} if args.load_format else {}))
    if on_cpu:
        env.update(VBATCH_DTYPE="float32", VBATCH_ENFORCE_EAGER="true")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    results: dict = {"machine": platform_info(), "model": args.shape or "tiny-llama", "requests": args.requests,
                     "prompt_len": args.prompt_len, "output_len": args.output_len, "gpus": args.gpus,
                     "chunk_size": args.chunk_size, "stages": {}}
    stages = results["stages"]
    for stage in args.stages:
        try:
            if stage == "a":
                runs = [run_batch(batch, model, work / "a", "whole", dict(env, VBATCH_GPUS="1"), args.out)]
            elif stage == "b":
                runs = [run_batch(batch, model, work / "b", "whole", dict(env, VBATCH_GPUS=str(args.gpus)), args.out)]
            elif stage == "c":
                parts = split_file(batch, args.gpus, work)
                env_c = dict(env, VBATCH_GPUS=str(args.gpus), VBATCH_ENGINES_PER_BATCH="1")
                with ThreadPoolExecutor(len(parts)) as pool:
                    futures = [pool.submit(run_batch, part, model, work / "c", f"part-{i}", env_c, args.out)
                               for i, part in enumerate(parts)]
                    runs = [future.result() for future in futures]
            else:
                raise SystemExit(f"unknown stage {stage!r}")
            stages[stage] = stage_figures(runs)
            print(f"stage {stage}: {json.dumps(stages[stage])}", file=sys.stderr, flush=True)
        except (SystemExit, Exception) as exc:  # one failed stage must not lose the others' numbers
            stages[stage] = {"error": str(exc)}
            print(f"stage {stage} failed: {exc}", file=sys.stderr, flush=True)

    base = stages.get("a", {})
    for stage in ("b", "c"):
        figures = stages.get(stage, {})
        if "error" in base or "error" in figures or not base or not figures:
            continue
        for key in ("output_tokens_per_second_end_to_end", "output_tokens_per_second_generation"):
            if base.get(key) and figures.get(key):
                results[f"{stage}_over_a_{key.removeprefix('output_tokens_per_second_')}"] = round(
                    figures[key] / base[key], 3)
    (args.out / "multi_gpu.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
