"""Several engines on one machine (VBATCH_GPUS): on the CPU build each "device" is a slot of cores.

Two CPU engines stand in for two GPUs: the scheduling (slots, their locks, the chunks shared by a
batch's engines) is the same code; only the variable that pins an engine to its devices differs
(`VLLM_CPU_OMP_THREADS_BIND` here, `CUDA_VISIBLE_DEVICES` on a GPU machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import uuid

import pytest

from resources.device_slots import engine_slots, try_slot
from tests.support.cli import run_cli
from tests.support.environment import instance_env
from tests.support.files import REPO, read_jsonl, write_jsonl
from tests.support.processes import MARKER, marked_processes, process_name
from tests.support.request_lines import chat_lines
from tests.support.services import VLLM_BATCH
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(900)


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.rfind("\n{\n") + 1:])  # the summary is the last object


def engine_cores(engine: dict) -> set[int]:
    """The cores the engine's model runs on: its vLLM worker process's affinity, which vLLM sets from the slot's
    VLLM_CPU_OMP_THREADS_BIND (the environment of vLLM's processes cannot be read back: their process
    titles overwrite it)."""
    workers = [p for p in engine["engine_processes"] if p["name"].startswith("VLLM::Worker")]
    assert workers, json.dumps(engine)
    cores = set().union(*(set(p["cpus"]) for p in workers))
    slot_cores = {int(core) for rank in engine["devices"] for core in rank.split(",")}
    assert cores <= slot_cores, json.dumps(engine)
    return cores


def comparable(outputs: list[dict]) -> list[dict]:
    """Output lines without what differs by design between two runs (request ids, creation times)."""
    lines = []
    for line in outputs:
        body = dict(line["response"]["body"], created=None, id=None)
        lines.append({"custom_id": line["custom_id"], "id": line["id"], "body": body})
    return lines


def test_a_batch_split_over_two_engines_writes_each_chunk_once_and_the_same_output_as_one(tmp_path, tiny_model):
    batch = write_jsonl(tmp_path / "batch.jsonl", chat_lines(64))
    runs = {}
    for engines in (2, 1):
        env = instance_env(tmp_path / f"engines-{engines}", VBATCH_GPUS=str(engines), VBATCH_CHUNK_SIZE="8")
        result = run_cli(["run", str(batch), "--model", str(tiny_model), "--model-name", "tiny", "--batch-id", "split",
                          "--json"], env)
        runs[engines] = (summary_of(result), tmp_path / f"engines-{engines}" / "data" / "batches" / "split")

    split, split_dir = runs[2]
    assert split["completed"] == 64 and split["chunks_run"] == 8
    first, second = split["engines"]
    assert {first["slot"], second["slot"]} == {0, 1}
    assert first["pid"] != second["pid"]
    # Each engine ran on its own cores, and each chunk was written once, by one of them.
    assert not engine_cores(first) & engine_cores(second), json.dumps(split["engines"])
    assert first["chunks"] > 0 and second["chunks"] > 0 and first["chunks"] + second["chunks"] == 8
    assert sorted(p.name for p in (split_dir / "chunks").iterdir()) == [f"chunk-{i:06d}.parquet" for i in range(8)]

    single, single_dir = runs[1]
    assert single["completed"] == 64 and len(single["engines"]) == 1
    split_output = read_jsonl(split_dir / "results" / "output.jsonl")
    assert [line["custom_id"] for line in split_output] == [f"q{i}" for i in range(64)]  # input order
    assert comparable(split_output) == comparable(read_jsonl(single_dir / "results" / "output.jsonl"))


def test_two_batches_at_once_run_on_two_slots_with_their_own_cores(tmp_path, tiny_model):
    env = instance_env(tmp_path, VBATCH_GPUS="2", VBATCH_ENGINES_PER_BATCH="1", VBATCH_CHUNK_SIZE="8")
    processes = []
    for name in ("left", "right"):
        batch = write_jsonl(tmp_path / f"{name}.jsonl", chat_lines(24))
        processes.append(subprocess.Popen(
            VLLM_BATCH + ["run", str(batch), "--model", str(tiny_model), "--model-name", "tiny", "--batch-id", name, "--json"],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
    summaries = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=600)
            summaries.append(summary_of(subprocess.CompletedProcess(process.args, process.returncode, out, err)))
    finally:
        for process in processes:
            process.kill()
            process.wait()
    (left,), (right,) = (s["engines"] for s in summaries)
    # Each batch took a slot while the other held one: they ran at once, never on the same slot.
    assert {left["slot"], right["slot"]} == {0, 1}
    assert not engine_cores(left) & engine_cores(right), json.dumps([left, right])
    assert all(s["completed"] == 24 for s in summaries)


def test_a_split_batch_whose_step_is_killed_frees_its_engines_and_slots_and_resumes(tmp_path, tiny_model):
    marker = uuid.uuid4().hex
    env = instance_env(tmp_path, VBATCH_GPUS="2", VBATCH_CHUNK_SIZE="10", VBATCH_MAX_NUM_SEQS="32", **{MARKER: marker})
    batch = write_jsonl(tmp_path / "batch.jsonl", chat_lines(200, max_tokens=32))
    args = ["run", str(batch), "--model", str(tiny_model), "--model-name", "tiny", "--batch-id", "killed", "--json"]
    chunks = tmp_path / "data" / "batches" / "killed" / "chunks"
    step = subprocess.Popen(VLLM_BATCH + args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: len(list(chunks.glob("chunk-*.parquet"))) >= 3, 400, "three chunks", interval=0.2, watch=[step])
        step.kill()  # the step's process only: its workers and their engines must go by themselves
        step.wait()
        written = {p.name for p in chunks.glob("chunk-*.parquet")}
        wait_for(lambda: not marked_processes(marker), 120, "the killed step's workers and engines to exit",
                 explain=lambda: str([process_name(p) for p in marked_processes(marker)]))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(step.pid, signal.SIGKILL)
    for slot in engine_slots(2, 1, visible=[]):
        lease = try_slot(tmp_path / "data" / "engines", slot)
        assert lease is not None, f"{slot.describe()} is still held"
        lease.release()

    summary = summary_of(run_cli(args, env))
    assert summary["completed"] == 200 and summary["chunks_resumed"] >= len(written) >= 3
    assert summary["chunks_resumed"] + summary["chunks_run"] == 20
    output = read_jsonl(tmp_path / "data" / "batches" / "killed" / "results" / "output.jsonl")
    assert [line["custom_id"] for line in output] == [f"q{i}" for i in range(200)]


def test_gpu_settings_that_do_not_fit_stop_with_one_readable_line(tmp_path, tiny_model):
    env = instance_env(tmp_path, VBATCH_GPUS="3", VBATCH_TENSOR_PARALLEL_SIZE="2")
    batch = write_jsonl(tmp_path / "in.jsonl", chat_lines(3))
    result = run_cli(["run", str(batch), "--model", str(tiny_model), "--model-name", "tiny"], env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: VBATCH_GPUS=3 is not a multiple of VBATCH_TENSOR_PARALLEL_SIZE=2", result.stderr[-3000:]
    assert "Traceback" not in result.stderr
