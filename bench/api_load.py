"""The Batch API under load: concurrent official `openai` clients upload, create, poll and download for a while.

    flock /tmp/vbatch-engine.lock python bench/api_load.py --clients 50 --duration 180

The stack is the production one on a throwaway PostgreSQL cluster (bench/soak.py: `vllm-batch start`
and `vllm-batch serve`), with the warm engine host on (`--no-engine-host`: every run loads its own
engine). One batch is run to completion first (`--no-warm-up` skips it), so that the load does not
start behind the first engine load. Each client thread then loops: upload a small batch file, read it
back (metadata and content, compared byte for byte), list files, create a batch of it (at most one
unfinished batch per client), poll its batches and the batch list, and download the output file of
each batch that completed. Batches are tiny (a few short requests); the daemon still launches a real
run, a new process, for each. After the load, a drain phase (`--drain` s) polls the unfinished batches
until they end, downloading their outputs; the rest are cancelled, and every uploaded file is checked
again (retrieve + content + listed).

Reports per route: calls, p50/p99/max latency in ms (during the load); 5xx answers (must be 0), other
errors, files lost or changed (must be 0), the batches created / completed (during the load and in
all) / cancelled, and the outputs downloaded and verified (every input custom_id exactly once, with a
200 response; must all be). `queue_timeline` samples the queue tickets and the runs by status every
10 s. Latencies are measured in the client process (Python threads, one shared HTTP connection pool),
on the same machine as the server.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.soak import API_KEY, MODEL_NAME, SoakParams, soak_environment  # noqa: E402

TERMINAL = {"completed", "failed", "expired", "cancelled"}


@dataclass
class LoadReport:
    params: dict
    wall_s: float = 0.0
    routes: dict = field(default_factory=dict)
    server_errors: int = 0
    server_error_samples: list = field(default_factory=list)
    other_errors: dict = field(default_factory=dict)
    files_uploaded: int = 0
    files_lost: int = 0
    files_changed: int = 0
    batches_created: int = 0
    batches_completed: int = 0
    batches_failed: int = 0
    batches_cancelled_at_end: int = 0
    outputs_downloaded: int = 0
    outputs_verified: int = 0  # every input custom_id once in the output, nothing else
    outputs_wrong: int = 0
    requests_lost: int = 0  # over every downloaded output: input custom_ids missing from it
    requests_duplicated: int = 0
    batch_wall_s: dict = field(default_factory=dict)  # created -> completed, as the Batch object says
    warm_up_s: float = 0.0  # one batch created and completed before the load (not in the counts)
    completed_during_load: int = 0
    drain_s: float = 0.0
    queue_timeline: list = field(default_factory=list)  # tickets waiting and runs by status, every 10 s


class Recorder:
    """Latency samples per route and errors, shared by the client threads."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.server_errors = 0
        self.server_error_samples: list[str] = []
        self.other_errors: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def call(self, route: str, fn):
        import openai

        started = time.perf_counter()
        try:
            result = fn()
        except openai.APIStatusError as exc:
            with self.lock:
                if exc.status_code >= 500:
                    self.server_errors += 1
                    if len(self.server_error_samples) < 10:
                        self.server_error_samples.append(f"{route}: {exc.status_code} {str(exc)[:300]}")
                else:
                    self.other_errors[f"{route} {exc.status_code}"] += 1
            raise
        except openai.APIConnectionError:
            with self.lock:
                self.other_errors[f"{route} connection"] += 1
            raise
        elapsed = (time.perf_counter() - started) * 1000
        with self.lock:
            self.samples[route].append(elapsed)
        return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def custom_ids(client_index: int, iteration: int, requests: int) -> list[str]:
    return [f"c{client_index}-i{iteration}-r{r}" for r in range(requests)]


def batch_file(client_index: int, iteration: int, requests: int) -> bytes:
    lines = [json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                         "body": {"model": MODEL_NAME, "prompt": f"Client {client_index} item {r}", "max_tokens": 4,
                                  "temperature": 0}})
             for r, custom_id in enumerate(custom_ids(client_index, iteration, requests))]
    return ("\n".join(lines) + "\n").encode()


def check_output(state: dict, text: str) -> None:
    """Record a downloaded output file against the batch's input: each custom_id once, with a response."""
    found = Counter()
    answered = 0
    for line in text.splitlines():
        record = json.loads(line)
        found[record.get("custom_id")] += 1
        answered += record.get("response") is not None and record["response"].get("status_code") == 200
    expected = state["custom_ids"]
    state["downloaded"] = True
    state["lost"] = sum(1 for custom_id in expected if custom_id not in found)
    state["duplicated"] = sum(count - 1 for count in found.values() if count > 1)
    state["verified"] = (set(found) == set(expected) and not state["duplicated"] and answered == len(expected))


def download(recorder: Recorder, client, batch_id: str, batches: dict[str, dict]) -> None:
    """Poll one batch; once it completed, download its output file and check it."""
    state = batches[batch_id]
    batch = recorder.call("GET /batches/{id}", lambda: client.batches.retrieve(batch_id))
    state["status"] = batch.status
    if batch.status == "completed" and batch.output_file_id and not state["downloaded"]:
        text = recorder.call("GET /files/{id}/content (output)",
                             lambda: client.files.content(batch.output_file_id)).text
        check_output(state, text)
        state["wall_s"] = (batch.completed_at or 0) - batch.created_at


def client_loop(index: int, base_url: str, recorder: Recorder, stop_at: float, requests: int,
                uploaded: dict[str, str], batches: dict[str, dict], seed: int) -> None:
    import openai
    from openai import OpenAI

    rng = random.Random(seed * 1000 + index)
    mine: list[str] = []
    client = OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120)
    iteration = 0
    while time.monotonic() < stop_at:
        iteration += 1
        try:
            content = batch_file(index, iteration, requests)
            file = recorder.call("POST /files", lambda c=content, i=iteration: client.files.create(
                file=(f"load-{index}-{i}.jsonl", c), purpose="batch"))
            uploaded[file.id] = hashlib.sha256(content).hexdigest()
            recorder.call("GET /files/{id}", lambda f=file.id: client.files.retrieve(f))
            body = recorder.call("GET /files/{id}/content", lambda f=file.id: client.files.content(f)).content
            if hashlib.sha256(body).hexdigest() != uploaded[file.id]:
                with recorder.lock:
                    recorder.other_errors["content differs right after upload"] += 1
            if rng.random() < 0.2:
                recorder.call("GET /files", lambda: client.files.list())
            unfinished = [b for b in mine if batches[b]["status"] not in TERMINAL]
            if not unfinished:
                created = recorder.call("POST /batches", lambda f=file.id: client.batches.create(
                    input_file_id=f, endpoint="/v1/completions", completion_window="24h"))
                batches[created.id] = {"status": created.status, "custom_ids": custom_ids(index, iteration, requests),
                                       "downloaded": False}
                mine.append(created.id)
            for batch_id in mine:
                if batches[batch_id]["status"] not in TERMINAL:
                    download(recorder, client, batch_id, batches)
            if rng.random() < 0.2:
                recorder.call("GET /batches", lambda: client.batches.list(limit=20))
            time.sleep(rng.uniform(0.0, 0.5))  # think time: clients are not in lock step
        except (openai.APIStatusError, openai.APIConnectionError):
            time.sleep(0.5)
    client.close()


class QueueWatch(threading.Thread):
    """Samples, every `interval` s, the queue tickets waiting for the sensor and the runs by status."""

    def __init__(self, services, interval: float = 10.0):
        super().__init__(daemon=True)
        self.services = services
        self.interval = interval
        self.samples: list[dict] = []
        self.stopping = threading.Event()
        self.started = time.monotonic()

    def run(self) -> None:
        from dagster import DagsterInstance

        instance = DagsterInstance.from_config(self.services.env["DAGSTER_HOME"])
        queue = self.services.data_dir / "queue"
        while not self.stopping.wait(self.interval):
            try:
                statuses = Counter(r.dagster_run.status.value for r in instance.get_run_records())
            except Exception as exc:  # noqa: BLE001  (a sample missed is no reason to stop sampling)
                statuses = Counter({f"error: {type(exc).__name__}": 1})
            tickets = len(list(queue.glob("*.json"))) if queue.is_dir() else 0
            self.samples.append({"t": round(time.monotonic() - self.started), "tickets": tickets, **statuses})
        instance.dispose()


def drain(base_url: str, batches: dict[str, dict], deadline: float, recorder: Recorder) -> None:
    """After the load: poll every unfinished batch until it ends (downloading each output) or the deadline."""
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120)
    while time.monotonic() < deadline:
        unfinished = [b for b, state in batches.items() if state["status"] not in TERMINAL]
        if not unfinished:
            break
        for batch_id in unfinished:
            try:
                download(recorder, client, batch_id, batches)
            except (openai.APIStatusError, openai.APIConnectionError):
                pass
        time.sleep(2)
    client.close()


def warm_up(base_url: str, requests: int, timeout: float) -> float:
    """One batch through the API before the load, until it completed: the daemon's code server and the
    warm engine (engine host) are up, so the load measures the API, not the first engine load."""
    from openai import OpenAI

    started = time.monotonic()
    client = OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120)
    file = client.files.create(file=("warm-up.jsonl", batch_file(-1, 0, requests)), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
    state = {"status": batch.status, "custom_ids": custom_ids(-1, 0, requests), "downloaded": False}
    while state["status"] not in TERMINAL:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the warm-up batch is still {state['status']} after {timeout:.0f}s")
        time.sleep(1)
        download(Recorder(), client, batch.id, {batch.id: state})
    client.close()
    if state["status"] != "completed" or not state.get("verified"):
        raise RuntimeError(f"the warm-up batch ended {state['status']} (output verified: {state.get('verified')})")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=180.0, help="Seconds of load.")
    parser.add_argument("--drain", type=float, default=300.0,
                        help="Seconds after the load for unfinished batches to end (their outputs downloaded and "
                             "checked) before the rest are cancelled.")
    parser.add_argument("--requests-per-batch", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-engine-host", dest="engine_host", action="store_false",
                        help="Without VBATCH_ENGINE_HOST: every run loads its own engine (~35 s or more on 2 cores).")
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                        help="Start the load at once, not after one batch has completed.")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder (service logs, data).")
    parser.add_argument("--output", type=Path, help="Report file (default: bench/results/api-load-<time>.json).")
    args = parser.parse_args()

    import openai
    from openai import OpenAI

    report = LoadReport(params=vars(args) | {"output": str(args.output) if args.output else None})
    root = Path(tempfile.mkdtemp(prefix="vbatch-api-load-"))
    recorder, drained = Recorder(), Recorder()
    uploaded: dict[str, str] = {}
    batches: dict[str, dict] = {}
    extra = {"VBATCH_ENGINE_HOST": "true"} if args.engine_host else {}
    try:
        with soak_environment(SoakParams(chunk_size=16, max_num_seqs=16), root, extra) as (services, _):
            if args.warm_up:
                report.warm_up_s = round(warm_up(services.base_url, args.requests_per_batch, 900), 1)
            watch = QueueWatch(services)
            watch.start()
            started = time.monotonic()
            stop_at = started + args.duration
            threads = [threading.Thread(target=client_loop, args=(i, services.base_url, recorder, stop_at,
                                                                    args.requests_per_batch, uploaded, batches,
                                                                    args.seed), daemon=True)
                       for i in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            report.wall_s = round(time.monotonic() - started, 1)
            report.completed_during_load = sum(1 for b in batches.values() if b["status"] == "completed")
            drain(services.base_url, batches, time.monotonic() + args.drain, drained)
            report.drain_s = round(time.monotonic() - started - report.wall_s, 1)
            watch.stopping.set()
            watch.join()
            report.queue_timeline = watch.samples

            client = OpenAI(base_url=services.base_url, api_key=API_KEY, max_retries=0, timeout=120)
            for batch_id, state in batches.items():
                if state["status"] not in TERMINAL:
                    try:
                        state["status"] = client.batches.cancel(batch_id).status
                        report.batches_cancelled_at_end += 1
                    except openai.BadRequestError:  # it finished in between
                        state["status"] = client.batches.retrieve(batch_id).status
            listed = {f.id for f in client.files.list()}
            for file_id, digest in uploaded.items():
                try:
                    client.files.retrieve(file_id)
                    if hashlib.sha256(client.files.content(file_id).content).hexdigest() != digest:
                        report.files_changed += 1
                except openai.NotFoundError:
                    report.files_lost += 1
                    continue
                if file_id not in listed:
                    report.files_lost += 1
            client.close()
    finally:
        if args.keep:
            print(f"work folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    report.routes = {route: {"calls": len(values), "p50_ms": round(statistics.median(values), 1),
                             "p99_ms": round(percentile(values, 0.99), 1), "max_ms": round(max(values), 1)}
                     for route, values in sorted(recorder.samples.items())}
    report.server_errors = recorder.server_errors + drained.server_errors
    report.server_error_samples = recorder.server_error_samples + drained.server_error_samples
    report.other_errors = dict(recorder.other_errors) | {f"{k} (drain)": v for k, v in drained.other_errors.items()}
    report.files_uploaded = len(uploaded)
    report.batches_created = len(batches)
    report.batches_completed = sum(1 for b in batches.values() if b["status"] == "completed")
    report.batches_failed = sum(1 for b in batches.values() if b["status"] == "failed")
    downloaded = [b for b in batches.values() if b["downloaded"]]
    report.outputs_downloaded = len(downloaded)
    report.outputs_verified = sum(1 for b in downloaded if b["verified"])
    report.outputs_wrong = report.outputs_downloaded - report.outputs_verified
    report.requests_lost = sum(b["lost"] for b in downloaded)
    report.requests_duplicated = sum(b["duplicated"] for b in downloaded)
    walls = sorted(b["wall_s"] for b in downloaded)
    if walls:
        report.batch_wall_s = {"min": walls[0], "p50": statistics.median(walls), "max": walls[-1]}
    output = args.output or REPO / "bench" / "results" / f"api-load-{time.strftime('%Y%m%dT%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(json.dumps({k: v for k, v in asdict(report).items() if k != "queue_timeline"}, indent=2))
    print(f"report: {output}")
    if report.server_errors or report.files_lost or report.files_changed or report.outputs_wrong:
        sys.exit(1)


if __name__ == "__main__":
    main()
