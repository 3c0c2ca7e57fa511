"""CPU engine defaults: a bare `LLM.chat` script vs `vllm-batch run`, with and without `enforce_eager`.

    python bench/cpu_defaults.py --requests 12000 --repeats 2

Every system is a child process of this one, run one after the other and alternated per repeat, so
that each pair shares the same (noisy, shared) cores at about the same time:
  bare-eager / bare-compiled   `python bench/cpu_defaults.py --bare`: import vLLM, build `LLM(...)`,
                               `LLM.chat` over the whole file, write one JSON line per output; end to end
  run-eager / run-compiled     `python -m batch_pipeline.entrypoints.cli run FILE --json` with VBATCH_ENFORCE_EAGER set
  run-default                  the same with VBATCH_ENFORCE_EAGER unset (the resource's platform default)
Prints one JSON object per run and a summary, and writes them to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bare(model: str, input_path: Path, output_path: Path, eager: bool, max_model_len: int) -> None:
    """The baseline a user would write: import, load, chat over everything, write the outputs."""
    started = time.perf_counter()
    from vllm import LLM, SamplingParams

    imported = time.perf_counter()
    llm = LLM(model=model, dtype="float32", enforce_eager=eager, max_model_len=max_model_len, seed=0)
    loaded = time.perf_counter()
    conversations, params = [], []
    with input_path.open() as handle:
        for line in handle:
            body = json.loads(line)["body"]
            conversations.append(body["messages"])
            params.append(SamplingParams(max_tokens=body["max_tokens"], temperature=body["temperature"],
                                         ignore_eos=body.get("ignore_eos", False)))
    outputs = llm.chat(conversations, params, use_tqdm=False)
    generated = time.perf_counter()
    with output_path.open("w") as out:
        for output in outputs:
            out.write(json.dumps({"id": output.request_id, "text": output.outputs[0].text}) + "\n")
    written = time.perf_counter()
    llm.llm_engine.engine_core.shutdown()
    print(json.dumps({"import_seconds": imported - started, "load_seconds": loaded - imported,
                      "generation_seconds": generated - loaded, "write_seconds": written - generated,
                      "shutdown_seconds": time.perf_counter() - written,
                      "completion_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}))


def run_child(cmd: list[str], env: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = proc.stdout
    return seconds, json.loads(out[out.index("{"):]) if "{" in out else {}


def main() -> None:
    from bench.workload import add_workload_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    add_workload_arguments(parser, requests=12000, max_model_len=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--systems", default="bare-eager,run-default,bare-compiled,run-compiled")
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "cpu-defaults")
    args = parser.parse_args()
    if args.bare:
        bare(args.model, args.input, args.input.with_suffix(".bare-out.jsonl"), args.eager, args.max_model_len)
        return

    from batch_pipeline.domain.tiny_model import build_tiny_model
    from bench.workload import vocabulary_words, write_batch

    model = str(Path(args.model or build_tiny_model(REPO / "models" / "tiny-llama")).resolve())
    work = Path(tempfile.mkdtemp(prefix="bench-defaults-"))
    batch = write_batch(work / "input.jsonl", args.requests, args.prompt_len, args.output_len,
                        vocabulary_words(Path(model)), model)
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    for name in ("VBATCH_ENFORCE_EAGER", "VBATCH_DTYPE"):
        env.pop(name, None)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for repeat in range(args.repeats):
        for system in args.systems.split(","):
            if system.startswith("bare"):
                cmd = [sys.executable, "bench/cpu_defaults.py", "--bare", "--model", model, "--input", str(batch),
                       "--max-model-len", str(args.max_model_len)] + (["--eager"] if system == "bare-eager" else [])
                child_env = env
            else:
                cmd = [sys.executable, "-m", "batch_pipeline.entrypoints.cli", "run", str(batch), "--model", model, "--json",
                       "--batch-id", f"defaults-{system}-{repeat}"]
                child_env = dict(env, VBATCH_HOME=str(REPO), VBATCH_DATA_DIR=str(work / "data"),
                                 DAGSTER_HOME=str(work / f"dagster-{system}-{repeat}"),
                                 VBATCH_MAX_MODEL_LEN=str(args.max_model_len))
                if system != "run-default":
                    child_env["VBATCH_ENFORCE_EAGER"] = "true" if system == "run-eager" else "false"
            seconds, detail = run_child(cmd, child_env)
            row = {"system": system, "repeat": repeat, "wall_seconds": round(seconds, 2)}
            for key in ("import_seconds", "load_seconds", "generation_seconds", "engine_load_seconds", "completed"):
                if key in detail:
                    row[key] = round(detail[key], 2) if isinstance(detail[key], float) else detail[key]
            runs.append(row)
            print(json.dumps(row), flush=True)
    summary: dict[str, dict] = {}
    for system in args.systems.split(","):
        mine = [r for r in runs if r["system"] == system]
        summary[system] = {"mean_wall_seconds": round(sum(r["wall_seconds"] for r in mine) / len(mine), 2)}
    for system in (s for s in args.systems.split(",") if s.startswith("run")):
        # Issue 19's figure: bare wall / run wall per repeat (pairs run back to back), and their median.
        ratios = sorted(bare["wall_seconds"] / run["wall_seconds"] for bare, run in zip(
            (r for r in runs if r["system"] == "bare-eager"), (r for r in runs if r["system"] == system),
            strict=False))
        if ratios:
            summary[system]["bare_eager_over_run"] = [round(r, 3) for r in ratios]
            summary[system]["median_bare_eager_over_run"] = round(ratios[len(ratios) // 2], 3)
    print(json.dumps(summary, indent=2))
    (args.out / "results.json").write_text(json.dumps({"requests": args.requests, "runs": runs, "summary": summary},
                                                       indent=2))


if __name__ == "__main__":
    main()
