"""Where the time of `vllm-batch run` goes, next to a bare `LLM.chat` script on the same file (CPU, issue 19).

    python bench/run_breakdown.py --requests 3000 --pairs 1

Each pair runs the bare script (bench/cpu_defaults.py --bare) and then `vllm-batch run` as children of
this process, one after the other. The pipeline child is the real CLI with timestamps added around
its phases (module attributes wrapped before `run` starts; nothing else changes), and the run's
Dagster event log gives the steps and the chunk writes. Prints, per pair, each phase's seconds from
the process's start, and writes them to --out. On a shared machine, compare phases, not totals.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _stamp(log: Path, name: str) -> None:
    with log.open("a") as out:
        out.write(json.dumps({"phase": name, "t": time.time()}) + "\n")


def _timed(log: Path, owner: object, attribute: str, name: str) -> None:
    """Replace `owner.attribute` by a wrapper that stamps `name start` and `name end` around each call."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        _stamp(log, f"{name} start")
        try:
            return original(*args, **kwargs)
        finally:
            _stamp(log, f"{name} end")

    setattr(owner, attribute, wrapper)


def traced_cli(log: Path, cli_args: list[str]) -> None:
    """`vllm-batch run ...` in this process, with its phases stamped into `log`."""
    atexit.register(_stamp, log, "atexit (last handler)")  # registered first, so it runs last
    _stamp(log, "imports start")
    from batch_pipeline.domain import generation, instance
    from batch_pipeline.entrypoints import cli, local_run
    from resources import local_engine, vllm_engine

    _stamp(log, "imports end")

    def build_llm(kwargs):
        _stamp(log, "vllm import start")
        import vllm  # noqa: F401

        _stamp(log, "vllm import end")
        return local_engine.build_llm(kwargs)

    vllm_engine.build_llm = build_llm  # type: ignore[assignment]
    _timed(log, vllm_engine, "build_llm", "engine load (import + LLM())")
    _timed(log, instance, "open_instance", "open instance")
    _timed(log, local_run, "register_local_batch", "register batch")
    _timed(log, vllm_engine.VLLMEngine, "prefetch", "prefetch call")
    _timed(log, local_run, "run_batch_in_process", "dagster run")
    _timed(log, generation, "run_chunks", "generation")
    _timed(log, local_engine.LoadedEngine, "shutdown", "engine shutdown")
    try:
        cli.main(["run", *cli_args], standalone_mode=False)
    finally:
        _stamp(log, "cli returned")


def run_events(dagster_home: Path) -> list[tuple[float, str]]:
    """(unix time, what) for the steps and chunk writes in the instance's run event logs."""
    events = []
    for db in sorted((dagster_home / "history" / "runs").glob("*.db")):
        if db.name == "index.db":
            continue
        with sqlite3.connect(db) as con:
            for stamp, kind, step in con.execute("select timestamp, dagster_event_type, step_key from event_logs"):
                if kind in ("STEP_START", "STEP_SUCCESS", "ASSET_OBSERVATION", "PIPELINE_START", "PIPELINE_SUCCESS"):
                    when = datetime.fromisoformat(str(stamp)).replace(tzinfo=timezone.utc).timestamp()
                    events.append((when, f"{kind} {step or ''}".strip()))
    return sorted(events)


def pipeline_phases(stamps: list[dict], events: list[tuple[float, str]], started: float, ended: float) -> dict:
    """Seconds of each phase of one `vllm-batch run`, from its stamps and its run's events."""
    at = {s["phase"]: s["t"] - started for s in stamps}
    observations = [t - started for t, kind in events if kind.startswith("ASSET_OBSERVATION")]
    event_at = {kind: t - started for t, kind in events if not kind.startswith("ASSET_OBSERVATION")}
    phases = {
        "process start + CLI/Dagster imports": at["imports end"],
        "open instance (SQLite, migrations)": at["open instance end"] - at["open instance start"],
        "register batch": at["register batch end"] - at["register batch start"],
        "prefetch starts at": at["prefetch call start"],
        "vllm import (prefetch thread)": at["vllm import end"] - at["vllm import start"],
        "engine ready at": at["engine load (import + LLM()) end"],
        "engine load (LLM(), after import)": at["engine load (import + LLM()) end"] - at["vllm import end"],
        "dagster run starts at": at["dagster run start"],
        "batch_input step": event_at["STEP_SUCCESS batch_input"] - event_at["STEP_START batch_input"],
        "batch_chunks starts at": event_at["STEP_START batch_chunks"],
        "wait for the engine in batch_chunks": at["generation start"] - event_at["STEP_START batch_chunks"],
        "generation (first admission to last chunk written)": at["generation end"] - at["generation start"],
        "first chunk written after generation start": (observations[0] - at["generation start"]) if observations else None,
        "engine shutdown": at["engine shutdown end"] - at["engine shutdown start"],
        "batch_chunks end after shutdown": event_at["STEP_SUCCESS batch_chunks"] - at["engine shutdown end"],
        "batch_results step": event_at["STEP_SUCCESS batch_results"] - event_at["STEP_START batch_results"],
        "run end to CLI return": at["cli returned"] - event_at["PIPELINE_SUCCESS"],
        "CLI return to exit (atexit, interpreter teardown)": ended - started - at["cli returned"],
        "total": ended - started,
    }
    return {name: round(value, 2) if value is not None else None for name, value in phases.items()}


def run_pair(args, model: str, batch: Path, work: Path, index: int) -> dict:
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    started = time.time()
    bare = subprocess.run([sys.executable, "bench/cpu_defaults.py", "--bare", "--eager", "--model", model, "--input",
                           str(batch), "--max-model-len", str(args.max_model_len)],
                          env=env, cwd=REPO, capture_output=True, text=True)
    bare_seconds = time.time() - started
    if bare.returncode != 0:
        raise SystemExit(f"the bare script failed: {bare.stderr[-2000:]}")
    bare_phases = json.loads(bare.stdout.strip().splitlines()[-1])
    bare_phases["total"] = round(bare_seconds, 2)

    home = work / f"pipeline-{index}"
    log = home / "stamps.jsonl"
    (home / "dagster").mkdir(parents=True)
    run_env = dict(env, VBATCH_HOME=str(REPO), VBATCH_DATA_DIR=str(home / "data"), DAGSTER_HOME=str(home / "dagster"),
                   VBATCH_DTYPE="float32", VBATCH_ENFORCE_EAGER="true", VBATCH_MAX_MODEL_LEN=str(args.max_model_len))
    started = time.time()
    run = subprocess.run([sys.executable, "bench/run_breakdown.py", "--child", str(log), "--", str(batch), "--model", model,
                          "--model-name", "bench", "--json"], env=run_env, cwd=REPO, capture_output=True, text=True)
    ended = time.time()
    if run.returncode != 0:
        raise SystemExit(f"vllm-batch run failed: {run.stderr[-2000:]}")
    stamps = [json.loads(line) for line in log.read_text().splitlines()]
    phases = pipeline_phases(stamps, run_events(home / "dagster"), started, ended)
    return {"pair": index, "bare": bare_phases, "pipeline": phases,
            "bare_over_run": round(bare_phases["total"] / phases["total"], 3)}


def main() -> None:
    from bench.workload import add_workload_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    add_workload_arguments(parser, requests=3000, max_model_len=512)
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "run-breakdown")
    args, rest = parser.parse_known_args()
    if args.child:
        traced_cli(args.child, [a for a in rest if a != "--"])
        return

    from batch_pipeline.domain.tiny_model import build_tiny_model
    from bench.workload import vocabulary_words, write_batch

    model = str(Path(args.model or build_tiny_model(REPO / "models" / "tiny-llama")).resolve())
    work = Path(tempfile.mkdtemp(prefix="bench-breakdown-"))
    batch = write_batch(work / "input.jsonl", args.requests, args.prompt_len, args.output_len,
                        vocabulary_words(Path(model)), "bench")
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for index in range(args.pairs):
        pairs.append(run_pair(args, model, batch, work, index))
        print(json.dumps(pairs[-1], indent=2), flush=True)
    (args.out / "results.json").write_text(json.dumps({"requests": args.requests, "pairs": pairs}, indent=2))


if __name__ == "__main__":
    main()
