"""Fault-injection soak: one batch through the Batch API while its processes are SIGKILLed and PostgreSQL restarts.

    flock /tmp/vbatch-engine.lock python bench/soak.py --requests 5000 --kills 8 --seed 1

What runs: a throwaway PostgreSQL cluster (initdb + pg_ctl on a free port, from the installed server
binaries; the shared server is never touched), `vllm-batch start` (the supervisor: webserver +
daemon) on it, and `vllm-batch serve` (the API server; this script restarts it, as systemd would).
The batch is uploaded and created with the official `openai` client. While it runs, K SIGKILLs hit
the run worker, the daemon or the API server at seeded moments (each one once the batch has written
a seeded fraction of its chunks, plus a seeded 0-2 s), and PostgreSQL is restarted once. The
supervisor restarts its children; dagster.yaml's run retries re-launch a killed run, which resumes
from the chunk files.

The report (stdout and a JSON file under bench/results/) gives the restarts survived, requests lost
(no output or error line; must be 0), custom_ids duplicated across the output and error files (must
be 0), and the work redone: chunk files written more than once (each write is an AssetObservation
on `batch_chunks` in the instance, and this script watches the files' mtimes too) and the runs the
batch took. Work that was in flight in a killed worker (requests generated but not yet in a finished
chunk) leaves no trace and is not counted; it is at most one in-flight window per worker kill.

Worker kills are capped at dagster.yaml's `run_retries.max_retries`: every worker kill uses one
retry of the batch's run, and a run whose retries are spent stays failed until someone re-launches
it (a limit of automatic recovery the soak does not hide: pass --allow-exhausting-retries to see it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.environment import CPU_ENGINE, instance_env, models_file  # noqa: E402 - the repository is on the path now
from tests.support.ports import free_port  # noqa: E402
from tests.support.postgres import ThrowawayPostgres  # noqa: E402
from tests.support.processes import command_line, daemons_of, kill_marked, marked_processes  # noqa: E402
from tests.support.request_lines import completion_line  # noqa: E402
from tests.support.services import start_process, stop_processes  # noqa: E402
from tests.support.waiting import WaitTimeout, wait_for  # noqa: E402

MODEL_NAME = "tiny-llama"
API_KEY = "soak-" + uuid.uuid4().hex
TARGETS = ("worker", "daemon", "api")
SOAK_MARKER = "VBATCH_SOAK_MARKER"  # in the environment of every process the soak starts


@dataclass
class SoakParams:
    """What one soak does; every random choice comes from `seed`."""

    requests: int = 5000
    kills: int = 8
    seed: int = 1
    chunk_size: int = 100
    max_tokens: int = 32
    max_num_seqs: int = 32
    restart_postgres: bool = True
    allow_exhausting_retries: bool = False
    model: str = str(REPO / "models" / "tiny-llama")
    timeout_s: float = 3600.0


@dataclass
class Fault:
    """One planned fault and what became of it."""

    target: str  # worker, daemon, api or postgres
    at_fraction: float  # of the batch's chunks written
    delay_s: float
    done: bool = False
    pid: int | None = None
    at_chunks: int | None = None
    at_s: float | None = None  # when its moment came (a worker kill may then wait for a live worker)
    inflicted_s: float | None = None  # when the kill or restart happened
    inflicted_chunks: int | None = None  # chunk files on disk at that moment
    recovered_s: float | None = None  # API server: seconds from the kill until the new one answered /health
    note: str = ""


@dataclass
class SoakReport:
    params: dict
    batch_id: str = ""
    status: str = ""
    wall_s: float = 0.0
    faults: list[dict] = field(default_factory=list)
    restarts: dict = field(default_factory=dict)
    requests: int = 0
    output_lines: int = 0
    error_lines: int = 0
    error_codes: dict = field(default_factory=dict)
    lost: int = 0
    duplicated: int = 0
    chunks_total: int = 0
    chunk_writes: int = 0
    chunks_written_more_than_once: int = 0
    chunks_without_observation: int = 0  # on disk, but the worker died before it recorded the observation
    chunk_rewrites_seen_on_disk: int = 0
    runs: list[dict] = field(default_factory=list)
    api_5xx: int = 0
    api_connection_errors: int = 0


class SkipFault(Exception):
    """A planned fault that can no longer happen (the batch got there first)."""


# ---- the service under test ---------------------------------------------------------------------

@dataclass
class Services:
    root: Path
    env: dict[str, str]
    web_port: int
    api_port: int
    marker: str
    supervisor: subprocess.Popen | None = None
    api: subprocess.Popen | None = None
    api_starts: int = 0

    @property
    def data_dir(self) -> Path:
        return Path(self.env["VBATCH_DATA_DIR"])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/v1"

    def _popen(self, name: str, args: list[str]) -> subprocess.Popen:
        return start_process([sys.executable, "-m", "batch_pipeline.entrypoints.cli", *args], self.env,
                             self.root / f"{name}.log", append=True)

    def start_supervisor(self) -> None:
        self.supervisor = self._popen("supervisor", ["start", "--host", "127.0.0.1", "--port", str(self.web_port)])

    def start_api(self, timeout: float = 600) -> None:
        self.api = self._popen("api", ["serve", "--host", "127.0.0.1", "--port", str(self.api_port)])
        self.api_starts += 1
        wait_for(self.api_healthy, timeout, "the API server")

    def api_healthy(self) -> bool:
        assert self.api is not None and self.api.poll() is None, "the API server exited"
        url = f"http://127.0.0.1:{self.api_port}/health"
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200

    def webserver_up(self) -> bool:
        assert self.supervisor is not None and self.supervisor.poll() is None, "vllm-batch start exited"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/server_info", timeout=5) as response:
            return response.status == 200

    def daemons(self) -> list[psutil.Process]:
        assert self.supervisor is not None
        return daemons_of(self.supervisor.pid)

    def run_workers(self) -> list[psutil.Process]:
        """Live run worker processes of this soak.

        The daemon's code server starts each run as a `multiprocessing` spawn child (`spawn_main` in its
        command line); vLLM's engine core is spawned the same way, but by the worker, not the code server.
        """
        workers = []
        for process in marked_processes(self.marker, SOAK_MARKER):
            if "spawn_main" not in command_line(process):
                continue
            try:
                parent = process.parent()
            except psutil.Error:
                continue
            if parent is not None and "spawn_main" not in command_line(parent):
                workers.append(process)
        return workers

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        stop_processes(self.api, self.supervisor)
        # Anything that left the process groups (an orphaned engine core, a run worker) carries the marker.
        kill_marked(self.marker, SOAK_MARKER)
        wait_for(lambda: not marked_processes(self.marker, SOAK_MARKER), 30, "the soak's processes to exit")


def service_env(root: Path, params: SoakParams, postgres_url: str, marker: str) -> dict[str, str]:
    # A GPU machine sets its own engine settings; the model is read offline.
    engine = {key: os.environ.get(key, value) for key, value in CPU_ENGINE.items()} | {"HF_HUB_OFFLINE": "1"}
    return instance_env(root, **engine, **{SOAK_MARKER: marker}, VBATCH_POSTGRES_URL=postgres_url,
                        VBATCH_MODELS_FILE=str(models_file(root, {MODEL_NAME: params.model})), VBATCH_API_KEYS=API_KEY,
                        VBATCH_MAX_UPLOAD_BYTES=str(1 << 30), VBATCH_CHUNK_SIZE=str(params.chunk_size),
                        VBATCH_MAX_NUM_SEQS=str(params.max_num_seqs))


# ---- the plan -----------------------------------------------------------------------------------

def max_run_retries() -> int:
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    retries = config.get("run_retries", {})
    return int(retries.get("max_retries", 0)) if retries.get("enabled") else 0


def plan_faults(params: SoakParams) -> list[Fault]:
    """K kills (every target at least once when K >= 3) and one PostgreSQL restart, at seeded moments."""
    rng = random.Random(params.seed)
    targets = list(TARGETS[:params.kills]) + [rng.choice(TARGETS) for _ in range(params.kills - len(TARGETS))]
    if not params.allow_exhausting_retries:
        cap = max_run_retries()
        while targets.count("worker") > cap:
            targets[targets.index("worker")] = rng.choice(("daemon", "api"))
    rng.shuffle(targets)
    if params.restart_postgres:
        targets.append("postgres")
    fractions = sorted(rng.uniform(0.05, 0.9) for _ in targets)
    order = list(range(len(targets)))
    rng.shuffle(order)
    return [Fault(targets[i], round(fraction, 3), round(rng.uniform(0, 2), 2))
            for i, fraction in zip(order, fractions, strict=True)]


def request_lines(count: int, max_tokens: int) -> list[str]:
    return [json.dumps(completion_line(f"soak-{i}", f"Item {i} is", MODEL_NAME, max_tokens=max_tokens, ignore_eos=True))
            for i in range(count)]


# ---- the client side: the official client, retried through restarts ----------------------------

class Client:
    """The official `openai` client; a call that meets a restarting API server is tried again."""

    def __init__(self, base_url: str):
        from openai import OpenAI

        self.openai = OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=60)
        self.server_errors = 0
        self.connection_errors = 0

    def call(self, fn: Callable[[], object], timeout: float = 300):
        import openai

        deadline = time.monotonic() + timeout
        while True:
            try:
                return fn()
            except openai.APIConnectionError:
                self.connection_errors += 1
            except openai.InternalServerError:
                self.server_errors += 1
            if time.monotonic() > deadline:
                raise TimeoutError("the API server did not answer")
            time.sleep(0.5)


# ---- the soak -----------------------------------------------------------------------------------

class ChunkWatch(threading.Thread):
    """Watches the batch's chunk files: how many exist, and every time one was written again."""

    def __init__(self, chunks: Path):
        super().__init__(daemon=True)
        self.chunks = chunks
        self.mtimes: dict[str, int] = {}
        self.rewrites = 0
        self.stopping = threading.Event()

    def count(self) -> int:
        return len(self.mtimes)

    def run(self) -> None:
        while not self.stopping.is_set():
            if self.chunks.is_dir():
                for path in self.chunks.glob("chunk-*.parquet"):
                    try:
                        mtime = path.stat().st_mtime_ns
                    except FileNotFoundError:
                        continue
                    if path.name in self.mtimes and self.mtimes[path.name] != mtime:
                        self.rewrites += 1
                    self.mtimes[path.name] = mtime
            time.sleep(0.1)


def inflict(fault: Fault, services: Services, postgres: ThrowawayPostgres | None,
            finished: Callable[[], bool], clock: Callable[[], float], chunks: Callable[[], int]) -> None:
    """Carry out one fault now (a worker kill waits for a live worker, unless the chunks are all written)."""
    if fault.target == "worker":
        workers = wait_for(lambda: finished() or services.run_workers(), 300, "a live run worker", interval=0.2)
        if workers is True:
            raise SkipFault("every chunk was written before a worker was there to kill")
        fault.pid = workers[0].pid
        workers[0].kill()
    elif fault.target == "daemon":
        daemon = wait_for(services.daemons, 120, "the daemon")[0]
        fault.pid = daemon.pid
        daemon.kill()
    elif fault.target == "api":
        assert services.api is not None
        fault.pid = services.api.pid
        os.killpg(services.api.pid, signal.SIGKILL)
        services.api.wait()
        fault.done, fault.inflicted_s, fault.inflicted_chunks = True, clock(), chunks()
        services.start_api()  # what systemd's Restart=always would do
        fault.recovered_s = round(clock() - fault.inflicted_s, 1)
        return
    elif fault.target == "postgres":
        assert postgres is not None
        postgres.restart()
    fault.done, fault.inflicted_s, fault.inflicted_chunks = True, clock(), chunks()


def observed_chunk_writes(instance, batch_id: str) -> Counter:
    """How many times each chunk index was written, from the `batch_chunks` observations in the instance."""
    from dagster import AssetKey, DagsterEventType, EventRecordsFilter

    records = instance.get_event_records(EventRecordsFilter(
        event_type=DagsterEventType.ASSET_OBSERVATION, asset_key=AssetKey("batch_chunks"),
        asset_partitions=[batch_id]), limit=1_000_000)
    writes: Counter = Counter()
    for record in records:
        observation = record.event_log_entry.dagster_event.event_specific_data.asset_observation
        writes[observation.metadata["chunk"].value] += 1
    return writes


def stuck_state(instance, batch_id: str, services: Services, tail: int = 40) -> str:
    """What a soak that timed out was waiting on: the batch's runs, the soak's live processes, the logs' tails."""
    parts = []
    try:
        parts.append("runs: " + json.dumps(batch_runs(instance, batch_id)))
    except Exception as exc:  # noqa: BLE001 - a diagnosis must not hide the timeout
        parts.append(f"runs: unreadable ({exc})")
    processes = []
    for process in marked_processes(services.marker, SOAK_MARKER):
        with contextlib.suppress(psutil.Error):
            processes.append(f"{process.pid}<{process.ppid()} {process.status()} {command_line(process)[:160]}")
    parts.append("processes:\n  " + "\n  ".join(processes))
    for name in ("supervisor", "api"):
        lines = services.log(name).splitlines()[-tail:]
        parts.append(f"--- {name}.log (last {len(lines)} lines)\n" + "\n".join(lines))
    return "\n".join(parts)


def batch_runs(instance, batch_id: str) -> list[dict]:
    from dagster import RunsFilter

    records = instance.get_run_records(RunsFilter(tags={"dagster/partition": batch_id}))
    return [{"run_id": r.dagster_run.run_id, "status": r.dagster_run.status.value,
             "parent_run_id": r.dagster_run.tags.get("dagster/parent_run_id"),
             "retry_number": r.dagster_run.tags.get("dagster/retry_number")}
            for r in sorted(records, key=lambda r: r.create_timestamp)]


@contextlib.contextmanager
def soak_environment(params: SoakParams, root: Path, extra_env: dict[str, str] | None = None,
                     ) -> Iterator[tuple[Services, ThrowawayPostgres]]:
    """A throwaway PostgreSQL, `vllm-batch start` and `vllm-batch serve`, all stopped at the end."""
    postgres = ThrowawayPostgres()
    url = postgres.start()
    marker = uuid.uuid4().hex
    env = {**service_env(root, params, url, marker), **(extra_env or {})}
    services = Services(root, env, free_port(), free_port(), marker)
    old = os.environ.get("VBATCH_POSTGRES_URL")
    os.environ["VBATCH_POSTGRES_URL"] = url  # the instance's dagster.yaml reads it from the environment
    try:
        # Create the storage once before the processes race for it (as `vllm-batch` does under a lock).
        subprocess.run([sys.executable, "-m", "batch_pipeline.entrypoints.cli", "list"], cwd=REPO, env=services.env,
                       check=True, capture_output=True, timeout=300)
        services.start_supervisor()
        wait_for(services.webserver_up, 300, "the Dagster webserver")
        services.start_api()
        yield services, postgres
    finally:
        services.stop()
        postgres.stop()
        if old is None:
            os.environ.pop("VBATCH_POSTGRES_URL", None)
        else:
            os.environ["VBATCH_POSTGRES_URL"] = old


def run_soak(params: SoakParams, root: Path, echo: Callable[[str], None] = print) -> SoakReport:
    """Run one soak in `root` and return its report."""
    from dagster import DagsterInstance

    report = SoakReport(params=asdict(params), requests=params.requests)
    faults = plan_faults(params)
    lines = request_lines(params.requests, params.max_tokens)
    expected = [f"soak-{i}" for i in range(params.requests)]
    report.chunks_total = -(-params.requests // params.chunk_size)
    started = time.monotonic()
    with soak_environment(params, root) as (services, postgres):
        instance = DagsterInstance.from_config(services.env["DAGSTER_HOME"])
        wait_for(lambda: instance.get_daemon_heartbeats(), 300, "the daemon's first heartbeat")
        client = Client(services.base_url)
        path = root / "soak.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with path.open("rb") as handle:
            uploaded = client.call(lambda: client.openai.files.create(file=handle, purpose="batch"))
        batch = client.call(lambda: client.openai.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"))
        report.batch_id = batch.id
        echo(f"batch {batch.id}: {params.requests} requests in {report.chunks_total} chunks; "
             f"faults planned: {[(f.target, f.at_fraction) for f in faults]}")
        watch = ChunkWatch(services.data_dir / "batches" / batch.id / "chunks")
        watch.start()
        pending = list(faults)
        deadline = time.monotonic() + params.timeout_s
        last_poll = 0.0
        status = batch.status
        while status not in ("completed", "failed", "expired", "cancelled"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the batch is still {status} after {params.timeout_s:.0f}s "
                                   f"({watch.count()}/{report.chunks_total} chunks)\n"
                                   + stuck_state(instance, batch.id, services))
            if pending and watch.count() >= pending[0].at_fraction * report.chunks_total:
                fault = pending.pop(0)
                time.sleep(fault.delay_s)
                fault.at_chunks, fault.at_s = watch.count(), round(time.monotonic() - started, 1)
                try:
                    inflict(fault, services, postgres, lambda: watch.count() >= report.chunks_total,
                            lambda: round(time.monotonic() - started, 1), watch.count)
                    recovered = f", answering again {fault.recovered_s}s later" if fault.recovered_s is not None else ""
                    echo(f"{fault.inflicted_s:7.1f}s  {fault.target} {'killed' if fault.pid else 'restarted'} "
                         f"at {fault.inflicted_chunks}/{report.chunks_total} chunks (due at {fault.at_chunks}, "
                         f"{fault.at_s}s){recovered}")
                except (WaitTimeout, TimeoutError, SkipFault) as exc:
                    fault.note = str(exc)
                    what = "killed, but " if fault.done else "skipped: "
                    echo(f"{fault.at_s:7.1f}s  {fault.target}: {what}{exc}")
            if time.monotonic() - last_poll > 2:
                last_poll = time.monotonic()
                status = client.call(lambda: client.openai.batches.retrieve(batch.id)).status
            time.sleep(0.1)
        watch.stopping.set()
        watch.join()
        report.wall_s = round(time.monotonic() - started, 1)
        done = client.call(lambda: client.openai.batches.retrieve(batch.id))
        report.status = done.status
        outputs, errors = [], []
        if done.output_file_id:
            outputs = [json.loads(x) for x in
                       client.call(lambda: client.openai.files.content(done.output_file_id)).text.splitlines()]
        if done.error_file_id:
            errors = [json.loads(x) for x in
                      client.call(lambda: client.openai.files.content(done.error_file_id)).text.splitlines()]
        seen = Counter(record["custom_id"] for record in outputs + errors)
        report.output_lines, report.error_lines = len(outputs), len(errors)
        report.error_codes = dict(Counter(e["error"]["code"] for e in errors))
        report.lost = sum(1 for custom_id in expected if custom_id not in seen)
        report.duplicated = sum(1 for count in seen.values() if count > 1)
        writes = wait_for(lambda: observed_chunk_writes(instance, batch.id), 60, "the chunk observations")
        report.chunk_writes = sum(writes.values())
        report.chunks_written_more_than_once = sum(1 for count in writes.values() if count > 1)
        report.chunks_without_observation = len(set(range(report.chunks_total)) - set(writes))
        report.chunk_rewrites_seen_on_disk = watch.rewrites
        report.runs = wait_for(lambda: batch_runs(instance, batch.id), 60, "the batch's runs")
        report.api_5xx, report.api_connection_errors = client.server_errors, client.connection_errors
        supervisor_log = services.log("supervisor")
        report.restarts = {
            "daemon": supervisor_log.count("daemon exited with"),
            "webserver": supervisor_log.count("webserver exited with"),
            "api_server": services.api_starts - 1,
            "postgres": postgres.restarts,
            "run_retries": sum(1 for run in report.runs if run["parent_run_id"]),
        }
        report.faults = [asdict(f) for f in faults]
        instance.dispose()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = SoakParams()
    parser.add_argument("--requests", type=int, default=defaults.requests)
    parser.add_argument("--kills", type=int, default=defaults.kills)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--chunk-size", type=int, default=defaults.chunk_size)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--no-postgres-restart", action="store_true")
    parser.add_argument("--allow-exhausting-retries", action="store_true")
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--timeout-s", type=float, default=defaults.timeout_s, help="Give up on the batch after this.")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder (logs, data) for inspection.")
    parser.add_argument("--output", type=Path, help="Report file (default: bench/results/soak-<time>.json).")
    args = parser.parse_args()
    params = SoakParams(requests=args.requests, kills=args.kills, seed=args.seed, chunk_size=args.chunk_size,
                        max_tokens=args.max_tokens, max_num_seqs=args.max_num_seqs,
                        restart_postgres=not args.no_postgres_restart,
                        allow_exhausting_retries=args.allow_exhausting_retries, model=args.model,
                        timeout_s=args.timeout_s)
    root = Path(tempfile.mkdtemp(prefix="vbatch-soak-"))
    try:
        report = run_soak(params, root)
    finally:
        if args.keep:
            print(f"work folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    output = args.output or REPO / "bench" / "results" / f"soak-{time.strftime('%Y%m%dT%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(json.dumps({k: v for k, v in asdict(report).items() if k not in ("faults", "runs", "params")}, indent=2))
    print(f"report: {output}")
    if report.status != "completed" or report.lost or report.duplicated:
        sys.exit(1)


if __name__ == "__main__":
    main()
