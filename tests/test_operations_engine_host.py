"""The operations cases on the default engine: the warm engine host (issues 13 and 19).

The same `vllm-batch start` on PostgreSQL as tests/test_operations.py, with the engine kept in a host
process between runs and two batch steps of one model allowed to share it. What must still hold:
- pool and swap: batches of models A, B, A submitted at once all complete; a batch of B never runs
  while a batch of A is on the engine, and there is never more than one engine alive;
- cancel: a cancelled batch leaves the host warm, and the next batch of its model loads nothing;
- SIGKILL: a killed run worker leaves the host running; the run retry attaches to the same host and
  writes no finished chunk again.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.files import read_jsonl
from tests.support.postgres import fresh_database
from tests.support.processes import marked_processes, process_name
from tests.support.request_lines import item_line
from tests.support.service import (
    MODEL_A,
    MODEL_B,
    Service,
    chunk_mtimes,
    dead,
    explain_service,
    held_lines,
    log_time,
    start_service,
    submit,
    wait_terminal,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model: Path) -> Iterator[Service]:
    with fresh_database() as url, start_service(tmp_path_factory.mktemp("operations-host"), url, tiny_model,
                                                warm_engine=True, VBATCH_ENGINE_HOST_CLIENTS="2") as running:
        yield running


@pytest.fixture(autouse=True)
def released(service: Service) -> Iterator[None]:
    """No test leaves the service's runs held (`Service.hold`)."""
    yield
    service.release()


@pytest.fixture(scope="module")
def engines(service: Service) -> Iterator[EngineWatch]:
    watch = EngineWatch(service.marker)
    watch.start()
    yield watch
    watch.stopping.set()
    watch.join()


class EngineWatch(threading.Thread):
    """Samples the service's live vLLM engine cores every 0.25 s: never two at once on one slot."""

    def __init__(self, marker: str):
        super().__init__(daemon=True)
        self.marker = marker
        self.stopping = threading.Event()
        self.most = 0
        self.seen: set[int] = set()

    def run(self) -> None:
        while not self.stopping.is_set():
            cores = [p.pid for p in marked_processes(self.marker) if process_name(p).startswith("VLLM::EngineCor")]
            self.most = max(self.most, len(cores))
            self.seen.update(cores)
            time.sleep(0.25)


def host_record(service: Service) -> dict | None:
    from resources.engine_host_client import read_host

    return read_host(service.data_dir / "engines")


def host_loads(service: Service) -> int:
    log = service.data_dir / "engines" / "host.log"
    return log.read_text(errors="replace").count("engine host for") if log.exists() else 0


def succeeded(service: Service, batch_id: str) -> bool:
    return any(run.status.value == "SUCCESS" for run in service.runs(batch_id))


def test_batches_of_two_models_queue_share_and_swap_with_one_engine_at_a_time(service: Service, engines):
    batches = {"host-a1": MODEL_A, "host-b": MODEL_B, "host-a2": MODEL_A}
    lines = {batch_id: [item_line(f"{batch_id}-{i}", model, max_tokens=64) for i in range(16)]
             for batch_id, model in batches.items()}
    for batch_id, model in batches.items():
        submit(service, batch_id, lines[batch_id], model)
    for batch_id in batches:
        wait_for(lambda b=batch_id: succeeded(service, b), 600, f"batch {batch_id} to succeed", interval=2,
                 explain=lambda: explain_service(service))

    for batch_id in batches:
        outputs = read_jsonl(service.batch_dir(batch_id) / "results" / "output.jsonl")
        assert sorted(o["custom_id"] for o in outputs) == sorted(line["custom_id"] for line in lines[batch_id])
    # Each batch's time on the engine: from its step's "engine for ... ready" (attached) to its
    # "engine released" (detached). A step may start earlier and wait there for the engine slot.
    spans = {}
    for batch_id in batches:
        run = next(r for r in service.runs(batch_id) if r.status.value == "SUCCESS")
        ready, released = log_time(service, run.run_id, "engine for"), log_time(service, run.run_id, "engine released")
        assert ready is not None and released is not None, batch_id
        spans[batch_id] = (ready, released)
    b_start, b_end = spans["host-b"]
    for a in ("host-a1", "host-a2"):  # B and A never on the engine at the same time
        a_start, a_end = spans[a]
        assert a_end <= b_start or b_end <= a_start, f"a batch of A and one of B overlapped: {spans}"
    assert engines.most == 1, f"{engines.most} engines were alive at once"
    assert 2 <= host_loads(service) <= 3  # A, B, and A again unless both A batches ran before B
    print("batch_chunks spans:", json.dumps({k: [round(v - b_start, 1) for v in span] for k, span in spans.items()}))


def test_a_cancelled_batch_leaves_the_host_warm_for_the_next(service: Service, engines):
    batch_id = "host-cancel"
    service.hold()
    submit(service, batch_id, held_lines(batch_id), MODEL_A)
    wait_for(lambda: chunk_mtimes(service.batch_dir(batch_id)), 300, "a finished chunk", interval=0.2)
    host = host_record(service)
    assert host is not None and Path(host["model"]).name == MODEL_A
    loads = host_loads(service)
    run = service.runs(batch_id)[0]
    service.instance.run_coordinator.cancel_run(run.run_id)
    assert wait_terminal(service, run.run_id, 120) == "CANCELED"
    assert (still := host_record(service)) is not None and still["pid"] == host["pid"]  # the host stays warm
    service.release()

    after = "host-after-cancel"
    after_lines = [item_line(f"{after}-{i}", MODEL_A) for i in range(8)]
    submit(service, after, after_lines, MODEL_A)
    wait_for(lambda: succeeded(service, after), 300, "the next batch to succeed", interval=1,
             explain=lambda: explain_service(service))
    assert host_loads(service) == loads  # it attached: no engine loaded for it
    assert host_record(service)["pid"] == host["pid"]
    outputs = read_jsonl(service.batch_dir(after) / "results" / "output.jsonl")
    assert len({o["custom_id"] for o in outputs}) == len(after_lines)
    assert engines.most == 1


def test_a_killed_worker_leaves_the_host_and_its_retry_attaches_to_it(service: Service, engines):
    from batch_pipeline.orchestration.run_workers import worker_pid

    batch_id = "host-crash"
    lines = held_lines(batch_id)
    service.hold()
    submit(service, batch_id, lines, MODEL_A)
    batch_dir = service.batch_dir(batch_id)
    wait_for(lambda: chunk_mtimes(batch_dir), 300, "a finished chunk", interval=0.2)
    first_run = service.runs(batch_id)[0]
    host = host_record(service)
    assert host is not None
    loads = host_loads(service)
    pid, _ = wait_for(lambda: worker_pid(service.instance, first_run), 30, "the run worker's pid")
    worker = psutil.Process(pid)
    worker.kill()
    before_kill = chunk_mtimes(batch_dir)
    wait_for(lambda: dead(worker), 10, "the worker to die")
    service.release()

    assert wait_terminal(service, first_run.run_id, 120) == "FAILURE"
    wait_for(lambda: succeeded(service, batch_id), 600, "the retry to finish the batch", interval=2,
             explain=lambda: explain_service(service))
    retry = next(r for r in service.runs(batch_id) if r.status.value == "SUCCESS")
    assert retry.tags.get("dagster/parent_run_id") == first_run.run_id
    assert host_record(service)["pid"] == host["pid"] and host_loads(service) == loads  # the same warm engine
    after = chunk_mtimes(batch_dir)
    assert {name: after[name] for name in before_kill} == before_kill  # no finished chunk written again
    outputs = read_jsonl(batch_dir / "results" / "output.jsonl")
    assert sorted(o["custom_id"] for o in outputs) == sorted(line["custom_id"] for line in lines)
    assert engines.most == 1
