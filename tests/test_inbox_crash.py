"""The inbox takes a file exactly once even when the daemon dies after launching its run and before moving it.

`vllm-batch start` on SQLite with the test-only fault hook of batch_pipeline/domain/inbox.py
(VBATCH_TEST_FAULT_BEFORE_SETTLE): the sensor tick that would move the taken file out of the inbox
stops right before it, with the file's run already launched; the test SIGKILLs the daemon there. The
supervisor restarts the daemon, whose sensor finds the same file again: it must settle it without a
second run.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psutil
import pytest

from tests.support.environment import instance_env
from tests.support.files import read_jsonl, write_jsonl
from tests.support.ports import free_port
from tests.support.processes import MARKER, daemons_of, kill_marked
from tests.support.request_lines import completion_line
from tests.support.services import VLLM_BATCH, start_process, stop_processes
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(600)
MODEL = "tiny-llama"



def test_a_daemon_killed_between_launching_and_moving_an_inbox_file_runs_it_once(tmp_path: Path, tiny_model: Path):
    from dagster import DagsterInstance, RunsFilter

    from batch_pipeline.domain.inbox import run_key

    marker_file = tmp_path / "paused-before-settle"
    marker = uuid.uuid4().hex
    (tmp_path / "models.yaml").write_text(f"models:\n  {MODEL}:\n    path: {tiny_model}\n")
    env = instance_env(tmp_path, VBATCH_MODELS_FILE=str(tmp_path / "models.yaml"), VBATCH_INBOX_INTERVAL_SECONDS="1",
                  VBATCH_TEST_FAULT_BEFORE_SETTLE=str(marker_file), **{MARKER: marker})
    log = tmp_path / "service.log"
    service = start_process([*VLLM_BATCH, "start", "--port", str(free_port())], env, log)
    try:
        supervisor = psutil.Process(service.pid)
        first_daemon = wait_for(lambda: daemons_of(supervisor), 120, "the daemon", watch=[service], log=log)[0]
        inbox = tmp_path / "data" / "inbox"
        lines = [completion_line(f"once-{i}", f"Item {i}", MODEL, max_tokens=4) for i in range(3)]
        staged = write_jsonl(inbox / ".once.jsonl.part", lines)
        staged.rename(inbox / "once.jsonl")

        # The tick after the launch found the run and stopped right before moving the file: kill the daemon there.
        wait_for(marker_file.exists, 180, "the sensor to reach the move (the run is launched)", watch=[service],
                 log=log)
        assert (inbox / "once.jsonl").exists()
        first_daemon.kill()
        wait_for(lambda: [d for d in daemons_of(supervisor) if d.pid != first_daemon.pid], 60, "a restarted daemon",
                 watch=[service], log=log)

        # The restarted daemon's sensor moves the file without launching anything new.
        wait_for(lambda: not (inbox / "once.jsonl").exists(), 120, "the file to leave the inbox")
        with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            def inbox_runs() -> list:
                return [r.dagster_run for r in instance.get_run_records(RunsFilter(tags={"vllm_batch/source": "inbox"}))]

            run = wait_for(inbox_runs, 30, "the inbox run")[0]
            batch_id = run.tags["vllm_batch/batch_id"]
            assert run.tags["dagster/run_key"] == run_key(batch_id)
            wait_for(lambda: instance.get_run_by_id(run.run_id).is_finished, 300, "the run to finish")
            assert instance.get_run_by_id(run.run_id).is_success

            # Two more sensor ticks after the file left, to give a second launch every chance to happen.
            def ticks() -> int:
                states = [s for s in instance.all_instigator_state() if s.name == "inbox"]
                return len(instance.get_ticks(states[0].instigator_origin_id, states[0].selector_id, limit=1000))
            settled_at = ticks()
            wait_for(lambda: ticks() >= settled_at + 2, 60, "two more inbox ticks")
            assert [r.run_id for r in inbox_runs()] == [run.run_id]
            cursor = json.loads(next(s for s in instance.all_instigator_state() if s.name == "inbox")
                                .instigator_data.cursor or "{}")
            assert "once.jsonl" not in cursor.get("seen", {})
        processed = tmp_path / "data" / "inbox" / "processed" / f"{batch_id}.jsonl"
        assert read_jsonl(processed) == lines
        outputs = read_jsonl(tmp_path / "data" / "batches" / batch_id / "results" / "output.jsonl")
        assert [o["custom_id"] for o in outputs] == [line["custom_id"] for line in lines]
    finally:
        stop_processes(service)
        kill_marked(marker)  # the paused code server of the killed daemon, an engine core
