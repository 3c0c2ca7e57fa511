"""`vllm-batch start` (webserver + daemon) on PostgreSQL with models A and B, as the operations tests drive it.

`start_service` starts one in a folder of its own; every process it starts carries a marker in its
environment, so that the whole service (vLLM's engine processes included) can be found and stopped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.support.environment import instance_env, models_file
from tests.support.files import REPO, write_jsonl
from tests.support.ports import free_port
from tests.support.processes import MARKER, kill_marked, marked_processes, process_name, vllm_processes
from tests.support.request_lines import item_line
from tests.support.services import VENV_BIN, start_process, stop_processes
from tests.support.waiting import wait_for

MODEL_A, MODEL_B = "tiny-llama", "tiny-llama-b"
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


@dataclass
class Service:
    """The running service and the handles the tests need."""

    process: subprocess.Popen
    env: dict[str, str]
    root: Path
    data_dir: Path
    inbox: Path
    port: int
    instance: object
    settings: object
    marker: str
    log: Path

    def batch_dir(self, batch_id: str) -> Path:
        return self.data_dir / "batches" / batch_id

    def hold(self) -> None:
        """From now on every run's generation step waits after each chunk it writes (the test-only
        VBATCH_TEST_HOLD_FILE hook) until `release()` (the test modules release after each test)."""
        (self.root / "hold").touch()

    def release(self) -> None:
        (self.root / "hold").unlink(missing_ok=True)

    def runs(self, batch_id: str) -> list:
        """Every run of a batch partition, oldest first."""
        from dagster import RunsFilter

        records = self.instance.get_run_records(RunsFilter(tags={"dagster/partition": batch_id}))
        return [r.dagster_run for r in sorted(records, key=lambda r: r.create_timestamp)]

    def dagster(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the `dagster` CLI against the service's instance and workspace."""
        return subprocess.run([str(VENV_BIN / "dagster"), *args], env=self.env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)


def explain_service(service: Service) -> str:
    """What a stuck service was doing: its runs, its live processes, and the tails of its logs."""
    from dagster import RunsFilter

    lines = ["runs:"]
    for record in service.instance.get_run_records(RunsFilter(), limit=30):
        run = record.dagster_run
        lines.append(f"  {run.run_id[:8]} {run.tags.get('dagster/partition')} {run.status.value}")
        if run.status.value in ("STARTING", "STARTED", "CANCELING"):  # what an unfinished run last did
            for entry in service.instance.all_logs(run.run_id)[-8:]:
                lines.append(f"    {time.strftime('%H:%M:%S', time.gmtime(entry.timestamp))} "
                             f"{entry.dagster_event_type or ''} {(entry.user_message or '')[:160]}")
    lines.append("processes:")
    for process in marked_processes(service.marker):
        with contextlib.suppress(psutil.Error):
            lines.append(f"  {process.pid} {process_name(process)} {' '.join(process.cmdline())[:120]}")
    lines.append(f"load average: {os.getloadavg()}; most CPU time on the machine:")
    busiest = []
    for process in psutil.process_iter(["pid", "cpu_times", "cmdline", "create_time"]):
        with contextlib.suppress(psutil.Error, TypeError):
            busiest.append((sum(process.info["cpu_times"][:2]), process.info["pid"],
                            " ".join(process.info["cmdline"] or [])[:100]))
    lines.extend(f"  {cpu:8.0f}s {pid} {cmdline}" for cpu, pid, cmdline in sorted(busiest, reverse=True)[:8])
    for log in (service.log, service.data_dir / "engines" / "host.log"):
        if log.exists():
            lines.append(f"--- {log.name} (last 40 lines)")
            lines.extend(log.read_text(errors="replace").splitlines()[-40:])
    return "\n".join(lines)


def engine_processes(service: Service) -> list[psutil.Process]:
    """The service's live vLLM processes."""
    return vllm_processes(marked_processes(service.marker))


def run_status(service: Service, run_id: str) -> str:
    return service.instance.get_run_by_id(run_id).status.value


def wait_terminal(service: Service, run_id: str, timeout: float) -> str:
    return wait_for(lambda: (s := run_status(service, run_id)) in TERMINAL and s, timeout, f"run {run_id} to finish",
                    explain=lambda: explain_service(service))


def step_events(service: Service, run_id: str, step_key: str) -> dict[str, float]:
    """Timestamps of a step's start and end events in the instance's event log."""
    from dagster import DagsterEventType, EventRecordsFilter

    found = {}
    for kind in (DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
        for record in service.instance.get_event_records(EventRecordsFilter(event_type=kind), limit=1000):
            entry = record.event_log_entry
            if entry.run_id == run_id and entry.step_key == step_key:
                found[kind.value] = entry.timestamp
    return found


def log_time(service: Service, run_id: str, text: str) -> float | None:
    """When a run first logged a message containing `text`."""
    for entry in service.instance.all_logs(run_id):
        if text in (entry.user_message or ""):
            return entry.timestamp
    return None


def chunk_mtimes(batch_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((batch_dir / "chunks").glob("chunk-*.parquet"))}


def register(service: Service, batch_id: str, lines: list[dict], model: str) -> None:
    """Register a batch partition without launching anything (as a user would before `dagster job launch`)."""
    from batch_pipeline.entrypoints.local_run import register_local_batch

    path = write_jsonl(service.root / "files" / f"{batch_id}.jsonl", lines)
    model_dir = service.settings.home / "models" / "tiny-llama" if model == MODEL_A else service.root / MODEL_B
    register_local_batch(service.settings, service.instance, path, str(model_dir), model, batch_id=batch_id)


def submit(service: Service, batch_id: str, lines: list[dict], model: str) -> None:
    """Register a batch and leave a queue ticket for the `queued_batches` sensor."""
    from batch_pipeline.domain.batches import load_spec
    from batch_pipeline.domain.queue_tickets import enqueue
    from resources.storage import BatchPaths

    register(service, batch_id, lines, model)
    enqueue(service.data_dir, load_spec(BatchPaths(service.batch_dir(batch_id))))



@contextlib.contextmanager
def start_service(root: Path, postgres_url: str, tiny_model: Path, warm_engine: bool = False,
                  **extra_env: str) -> Iterator[Service]:
    """`vllm-batch start` in `root` on `postgres_url` (models A and B), stopped with every process it started.

    `warm_engine`: the default engine (the warm host); off, the opt-out (VBATCH_ENGINE_HOST=false).
    """
    from dagster import DagsterInstance

    from batch_pipeline.domain.settings import Settings

    shutil.copytree(tiny_model, root / MODEL_B)  # another model directory: loading it is a model swap
    models = models_file(root, {MODEL_A: tiny_model, MODEL_B: root / MODEL_B})
    port, marker = free_port(), uuid.uuid4().hex
    env = instance_env(
        root, **{MARKER: marker}, VBATCH_POSTGRES_URL=postgres_url, VBATCH_MODELS_FILE=str(models), VBATCH_CHUNK_SIZE="4",
        # Four sequences at a time: a chunk of 4 requests finishes before the next starts, so a
        # batch's chunks appear one by one and a test can act half-way through.
        VBATCH_MAX_NUM_SEQS="4", VBATCH_INBOX_INTERVAL_SECONDS="2", VBATCH_SCHEDULE_CRON="* * * * *",
        VBATCH_TEST_HOLD_FILE=str(root / "hold"), **extra_env)
    if not warm_engine:  # each run loads its own engine (tests/test_operations_engine_host.py: the default)
        env["VBATCH_ENGINE_HOST"] = "false"
    log = root / "service.log"
    process = start_process([str(VENV_BIN / "vllm-batch"), "start", "--host", "127.0.0.1", "--port", str(port)],
                            env, log)
    settings = Settings(home=REPO, data_dir=root / "data", chunk_size=4, models_file=models)
    old_postgres = os.environ.get("VBATCH_POSTGRES_URL")
    os.environ["VBATCH_POSTGRES_URL"] = postgres_url  # the instance's dagster.yaml reads it from the env
    try:
        def up() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5) as response:
                return response.status == 200
        wait_for(up, 180, "the Dagster webserver", watch=[process], log=log)
        instance = DagsterInstance.from_config(str(root / "dagster"))
        wait_for(lambda: instance.get_daemon_heartbeats(), 120, "the daemon's first heartbeat", watch=[process],
                 log=log)
        yield Service(process, env, root, root / "data", root / "data" / "inbox", port, instance, settings,
                      marker, log)
        instance.dispose()
    finally:
        stop_processes(process)
        kill_marked(marker)  # e.g. an engine orphaned by a test's SIGKILL
        if old_postgres is None:
            os.environ.pop("VBATCH_POSTGRES_URL", None)
        else:
            os.environ["VBATCH_POSTGRES_URL"] = old_postgres


HELD_CHUNKS = 14


def held_lines(prefix: str) -> list[dict]:
    """Short requests of model A for HELD_CHUNKS chunks: a test stops the batch half-way by holding it
    (`Service.hold`), not by making it slow, so the same test holds on any hardware."""
    return [item_line(f"{prefix}-{i}", MODEL_A, max_tokens=8) for i in range(4 * HELD_CHUNKS)]


def dead(process: psutil.Process) -> bool:
    """Whether the process has exited (a zombie counts)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True
