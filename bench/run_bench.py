"""The benchmark: raw vLLM (ceiling) vs `vllm run-batch` vs this pipeline, on the same batch file.

    python bench/run_bench.py                                  # CPU: the tiny model, 5,000 requests
    python bench/run_bench.py --shape llama-1b --load-format dummy --requests 5000 --prompt-len 128 --output-len 128

Three stages, each a child of this process, run one after the other on the same input:
  A  one process, one engine: LLM.generate over every request at once (the ceiling, engine loaded),
     then batch_job in-process at each chunk size (same engine), then the ceiling again;
  B  `python -m vllm.entrypoints.openai.run_batch` (what `vllm run-batch` runs), end to end;
  C  `vllm-batch run` (Dagster, embedded SQLite instance), end to end.
Prints a table and the ratios, and writes results.json and results.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_measured(cmd: list[str], env: dict, log: Path) -> tuple[float, float, str]:
    """Run `cmd`; return (wall seconds, peak RSS MiB of that process alone, stdout)."""
    import psutil

    started = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
        peak = [0]

        def poll() -> None:
            try:
                handle = psutil.Process(proc.pid)
                while proc.poll() is None:
                    peak[0] = max(peak[0], handle.memory_info().rss)
                    time.sleep(0.1)
            except psutil.NoSuchProcess:
                pass

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        out, _ = proc.communicate()
        watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed with {proc.returncode}; see {log}")
    return time.perf_counter() - started, peak[0] / 2**20, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="A model folder (default: the tiny test model).")
    parser.add_argument("--shape", choices=["llama-1b", "llama-8b"], help="Build a Llama-shaped folder instead.")
    parser.add_argument("--load-format", default=None, help="e.g. dummy: random weights from config.json.")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--mixed", action="store_true", help="Mixed prompt and output lengths.")
    parser.add_argument("--chunk-sizes", default="256,50,1000", help="The first is the default chunk size.")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--stages", default="ABC")
    parser.add_argument("--out", type=Path, default=REPO / ".bench")
    args = parser.parse_args()

    from bench.workload import vocabulary_words, write_batch, write_shape

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    if args.shape:
        model = str(write_shape(args.shape, work / args.shape))
    else:
        from batch_pipeline.domain.tiny_model import build_tiny_model

        model = str(Path(args.model or build_tiny_model(REPO / "models" / "tiny-llama")).resolve())
    on_cpu = not shutil.which("nvidia-smi")
    dtype = "float32" if on_cpu else "auto"
    engine_args = {"load_format": args.load_format} if args.load_format else {}
    words = vocabulary_words(Path(model))
    batch = write_batch(work / "input.jsonl", args.requests, args.prompt_len, args.output_len, words, "bench",
                        mixed=args.mixed)
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    if on_cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    args.out.mkdir(parents=True, exist_ok=True)
    common_flags = ["--dtype", dtype, "--max-model-len", str(args.max_model_len)] + (["--enforce-eager"] if on_cpu else [])
    results: dict = {"machine": platform_info(), "model": args.shape or "tiny-llama", "requests": args.requests,
                     "prompt_len": args.prompt_len, "output_len": args.output_len, "mixed": args.mixed}

    for stage in args.stages:
        try:
            run_stage(stage, args, model, batch, work, env, engine_args, dtype, on_cpu, common_flags, results)
        except (SystemExit, Exception) as exc:  # one failed stage must not lose the others' numbers
            results[f"{stage}_error"] = str(exc)
            print(f"stage {stage} failed: {exc}", flush=True)

    report = render(results)
    print(report)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(report)


def run_stage(stage, args, model, batch, work, env, engine_args, dtype, on_cpu, common_flags, results) -> None:
    """Run one stage (A, B or C) and store its numbers in `results`."""
    if stage == "A":
        seconds, rss, out = run_measured(
            [sys.executable, "bench/inprocess.py", "--model", model, "--input", str(batch), "--chunk-sizes",
             args.chunk_sizes, "--engine-args", json.dumps(engine_args)] + common_flags, env, args.out / "stage_a.log")
        results["A"] = json.loads(out.strip().splitlines()[-1])
        print(f"stage A done in {seconds:.0f}s", flush=True)
    if stage == "B":
        flags = common_flags + (["--load-format", args.load_format] if args.load_format else [])
        seconds, rss, _ = run_measured(
            [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(batch), "-o",
             str(work / "runbatch-output.jsonl"), "--model", model, "--served-model-name", "bench"] + flags,
            env, args.out / "stage_b.log")
        lines = sum(1 for _ in (work / "runbatch-output.jsonl").open())
        results["B"] = {"seconds": seconds, "peak_rss_mb": rss, "output_lines": lines}
        print(f"stage B done in {seconds:.0f}s", flush=True)
    if stage == "C":
        env_c = dict(env, VBATCH_HOME=str(REPO), VBATCH_DATA_DIR=str(work / "data"),
                     DAGSTER_HOME=str(work / "dagster"), VBATCH_DTYPE=dtype,
                     VBATCH_MAX_MODEL_LEN=str(args.max_model_len), VBATCH_ENGINE_ARGS=json.dumps(engine_args),
                     VBATCH_ENFORCE_EAGER="true" if on_cpu else "false",
                     VBATCH_CHUNK_SIZE=args.chunk_sizes.split(",")[0])
        seconds, rss, out = run_measured(
            [sys.executable, "-m", "batch_pipeline.entrypoints.cli", "run", str(batch), "--model", model, "--model-name",
             "bench", "--json"], env_c, args.out / "stage_c.log")
        results["C"] = {"seconds": seconds, "peak_rss_mb": rss, "summary": json.loads(out[out.index("{"):])}
        print(f"stage C done in {seconds:.0f}s", flush=True)


def platform_info() -> str:
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (FileNotFoundError, subprocess.TimeoutExpired):
        gpu = ""
    return f"{gpu or 'CPU only'}; {os.cpu_count()} cores; {platform.processor() or platform.machine()}"


def render(r: dict) -> str:
    rows = ["| system | wall (s) | excl. load (s) | req/s | gen tok/s | total tok/s | peak RSS (MiB) |",
            "|---|---|---|---|---|---|---|"]
    a = r.get("A")
    lines = [f"{r['model']}, {r['requests']} requests, prompt {r['prompt_len']}, output {r['output_len']}"
             f"{' (mixed)' if r['mixed'] else ''}; {r['machine']}", ""]

    def row(name, wall, excl, gen_tokens, prompt_tokens, rss):
        rows.append(f"| {name} | {wall if isinstance(wall, str) else f'{wall:.1f}'} | {excl:.2f} | "
                    f"{r['requests'] / excl:.1f} | {gen_tokens / excl:.0f} | {(gen_tokens + prompt_tokens) / excl:.0f} | "
                    f"{rss if isinstance(rss, str) else f'{rss:.0f}'} |")

    if a:
        gen, prompt = a["completion_tokens"], a["prompt_tokens"]
        ceiling = sum(a["ceiling_seconds"]) / len(a["ceiling_seconds"])
        row("1. vLLM LLM.generate (ceiling)", "-", ceiling, gen, prompt, "-")
        for p in a["pipeline"]:
            row(f"3. pipeline in-process, chunk {p['chunk_size']} (generation)", p["seconds"], p["generation_seconds"],
                gen, prompt, "-")
        lines.append(f"engine load (stage A): {a['load_seconds']:.1f}s; ceiling runs: "
                     + ", ".join(f"{s:.2f}s" for s in a["ceiling_seconds"]))
    if "B" in r:
        b = r["B"]
        rows.append(f"| 2. vllm run-batch (end to end) | {b['seconds']:.1f} | - | - | - | - | {b['peak_rss_mb']:.0f} |")
    if "C" in r:
        c = r["C"]
        rows.append(f"| 3. vllm-batch run (end to end) | {c['seconds']:.1f} | {c['summary']['generation_seconds']:.2f} "
                    f"| - | - | - | {c['peak_rss_mb']:.0f} |")
    lines += ["", *rows, ""]
    if a:
        for p in a["pipeline"]:
            fixed = p["seconds"] - p["generation_seconds"]
            lines.append(f"- chunk {p['chunk_size']}: pipeline/ceiling tokens/s = {ceiling / p['generation_seconds']:.3f} "
                         f"(excluding load); fixed per-batch overhead {fixed:.2f}s")
    if "B" in r and "C" in r:
        lines.append(f"- end to end, vllm run-batch / vllm-batch run wall time = {r['B']['seconds'] / r['C']['seconds']:.3f} "
                     "(>1 means the pipeline is faster)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
