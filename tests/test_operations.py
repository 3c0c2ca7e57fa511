"""Operating the pipeline the way Dagster users do, against a live `vllm-batch start` on PostgreSQL.

One service (webserver + daemon, started by `vllm-batch start`) serves the whole module; every test
drives it from outside: the inbox folder, queue tickets, `dagster job launch`, `dagster schedule
start`, the webserver's GraphQL API (what the UI's Terminate button calls), a real headless Chromium,
SIGKILL and a PostgreSQL restart. Runs execute the real CPU vLLM engine on the tiny model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from bench.soak import ThrowawayPostgres
from tests.support.files import REPO, read_jsonl, write_jsonl

pytestmark = pytest.mark.timeout(600)
VENV_BIN = Path(sys.executable).parent
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

    def runs(self, batch_id: str) -> list:
        """Every run of a batch partition, oldest first."""
        from dagster import RunsFilter

        records = self.instance.get_run_records(RunsFilter(tags={"dagster/partition": batch_id}))
        return [r.dagster_run for r in sorted(records, key=lambda r: r.create_timestamp)]

    def dagster(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the `dagster` CLI against the service's instance and workspace."""
        return subprocess.run([str(VENV_BIN / "dagster"), *args], env=self.env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 1.0,
             explain: Callable[[], str] | None = None):
    """Poll until `predicate` returns something truthy; survives a PostgreSQL restart in between.
    On a timeout, `explain()` (if given) says what the service was doing."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the database may be restarting
            last_error = exc
        time.sleep(interval)
    context = ""
    if explain is not None:
        try:
            context = "\n" + explain()
        except Exception as exc:  # the explanation must not hide the timeout
            context = f"\n(could not explain: {exc!r})"
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error}){context}")


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
            lines.append(f"  {process.pid} {_name(process)} {' '.join(process.cmdline())[:120]}")
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request_line(custom_id: str, model: str, max_tokens: int = 8, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": f"Item {custom_id} is", "max_tokens": max_tokens,
                     "temperature": 0, "ignore_eos": True, **body}}


def marked_processes(marker: str) -> list[psutil.Process]:
    """Every live process started for this module (they all carry the marker in their environment).

    vLLM's own processes (VLLM::EngineCore, VLLM::Worker) set their process title, which can overwrite
    the environment as /proc shows it; they count as marked when the process that started them is.
    """
    found, vllm = [], []
    for process in psutil.process_iter():
        try:
            if process.environ().get("VBATCH_TEST_MARKER") == marker:
                found.append(process)
            elif _name(process).startswith("VLLM::"):
                vllm.append(process)
        except psutil.Error:
            if _name(process).startswith("VLLM::"):
                vllm.append(process)
    pids = {p.pid for p in found}
    for process in vllm:
        with contextlib.suppress(psutil.Error):
            if any(parent.pid in pids for parent in process.parents()):
                found.append(process)
    return found


def engine_processes(service: Service) -> list[psutil.Process]:
    return [p for p in marked_processes(service.marker) if _name(p).startswith("VLLM::")]


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return ""


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


@pytest.fixture(scope="module")
def service(postgres_server: ThrowawayPostgres, tmp_path_factory, tiny_model: Path) -> Iterator[Service]:
    """`vllm-batch start` on a PostgreSQL server of its own, with its own data folder and a second model."""
    with start_service(tmp_path_factory.mktemp("operations"), postgres_server.url, tiny_model) as running:
        yield running


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[ThrowawayPostgres]:
    """A PostgreSQL cluster of this module's own: the crash test stops and restarts it, and the tests
    beside it (other pytest-xdist workers) keep the machine's server."""
    server = ThrowawayPostgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def start_service(root: Path, postgres_url: str, tiny_model: Path, warm_engine: bool = False,
                  **extra_env: str) -> Iterator[Service]:
    """`vllm-batch start` in `root` on `postgres_url` (models A and B), stopped with every process it started.

    `warm_engine`: the default engine (the warm host); off, the opt-out (VBATCH_ENGINE_HOST=false).
    """
    from dagster import DagsterInstance

    from batch_pipeline.domain.settings import Settings

    shutil.copytree(tiny_model, root / MODEL_B)  # another model directory: loading it is a model swap
    (root / "models.yaml").write_text(
        f"models:\n  {MODEL_A}:\n    path: {tiny_model}\n  {MODEL_B}:\n    path: {root / MODEL_B}\n")
    port, marker = free_port(), uuid.uuid4().hex
    env = {
        **os.environ,
        "VBATCH_TEST_MARKER": marker,
        "VBATCH_HOME": str(REPO),
        "DAGSTER_HOME": str(root / "dagster"),
        "VBATCH_DATA_DIR": str(root / "data"),
        "VBATCH_POSTGRES_URL": postgres_url,
        "VBATCH_MODELS_FILE": str(root / "models.yaml"),
        "VBATCH_CHUNK_SIZE": "4",
        "VBATCH_DTYPE": "float32",
        "VBATCH_ENFORCE_EAGER": "true",
        "VBATCH_MAX_MODEL_LEN": "1024",
        # Four sequences at a time: a chunk of 4 requests finishes before the next starts, so a
        # batch's chunks appear one by one and a test can act half-way through.
        "VBATCH_MAX_NUM_SEQS": "4",
        "VBATCH_INBOX_INTERVAL_SECONDS": "2",
        "VBATCH_SCHEDULE_CRON": "* * * * *",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
        **extra_env,
    }
    env.pop("VBATCH_ENGINE_HOST", None)
    if not warm_engine:  # each run loads its own engine (tests/test_operations_engine_host.py: the default)
        env["VBATCH_ENGINE_HOST"] = "false"
    log = root / "service.log"
    process = subprocess.Popen([str(VENV_BIN / "vllm-batch"), "start", "--host", "127.0.0.1", "--port", str(port)],
                               env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    settings = Settings(home=REPO, data_dir=root / "data", chunk_size=4,
                        models_file=root / "models.yaml")
    old_postgres = os.environ.get("VBATCH_POSTGRES_URL")
    os.environ["VBATCH_POSTGRES_URL"] = postgres_url  # the instance's dagster.yaml reads it from the env
    try:
        def up() -> bool:
            assert process.poll() is None, f"vllm-batch start exited:\n{log.read_text()[-3000:]}"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5) as response:
                return response.status == 200
        wait_for(up, 180, "the Dagster webserver")
        instance = DagsterInstance.from_config(str(root / "dagster"))
        wait_for(lambda: instance.get_daemon_heartbeats(), 120, "the daemon's first heartbeat")
        yield Service(process, env, root, root / "data", root / "data" / "inbox", port, instance, settings,
                      marker, log)
        instance.dispose()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for leftover in marked_processes(marker):  # e.g. an engine orphaned by a test's SIGKILL
            leftover.kill()
        if old_postgres is None:
            os.environ.pop("VBATCH_POSTGRES_URL", None)
        else:
            os.environ["VBATCH_POSTGRES_URL"] = old_postgres


# ---- the UI -------------------------------------------------------------------------------------

@pytest.fixture
def browser(service: Service) -> Iterator[object]:
    """Debian's headless Chromium, driven by Selenium through chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "install Chromium: make browser (apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--window-size=1400,1000"):
        options.add_argument(flag)
    # chromedriver and Chromium start in their own session so teardown can kill them as a group.
    driver_service = DriverService(driver, popen_kw={"start_new_session": True})
    browser = webdriver.Chrome(service=driver_service, options=options)
    browser.implicitly_wait(5)
    try:
        yield browser
    finally:
        pid = driver_service.process.pid if driver_service.process else None
        browser.quit()
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_ui_materialises_a_batch_partition_from_the_asset_graph(service: Service, browser):
    from selenium.webdriver.common.by import By

    batch_id = "ui-batch"
    lines = [request_line(f"ui-{i}", MODEL_A) for i in range(10)]
    register(service, batch_id, lines, MODEL_A)

    def find_button(text: str):
        return wait_for(lambda: [b for b in browser.find_elements(By.XPATH, f"//button[normalize-space()='{text}']")
                                 if b.is_displayed()], 60, f"the {text!r} button")[0]

    def click_button(text: str, escape_overlays: bool = False) -> None:
        """Click, dismissing pop-ups the UI may open late (what's-new dialogs) that cover the button."""
        from selenium.common.exceptions import ElementClickInterceptedException
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        for attempt in range(20):
            try:
                find_button(text).click()
                return
            except ElementClickInterceptedException:
                if attempt == 19:
                    raise
                for dismiss in browser.find_elements(
                        By.XPATH, "//button[normalize-space()='Skip' or normalize-space()='Dismiss' "
                                  "or normalize-space()='Close' or normalize-space()='Got it']"):
                    if dismiss.is_displayed():
                        dismiss.click()
                if escape_overlays:
                    ActionChains(browser).send_keys(Keys.ESCAPE).perform()
                time.sleep(1)

    browser.get(f"http://127.0.0.1:{service.port}/asset-groups/batch")
    wait_for(lambda: browser.find_elements(By.XPATH, "//*[normalize-space(text())='batch_results']"), 60,
             "the asset graph")
    # A fresh instance opens on the graph with no dialog over it (dagster.yaml turns Dagster's new-user
    # dialog off). find_elements waits up to the implicit 5 s for one to appear.
    dialogs = [d.text[:200] for d in browser.find_elements(By.XPATH, "//*[@role='dialog']") if d.is_displayed()]
    assert dialogs == [], f"a dialog covers the first page of a fresh instance: {dialogs}"
    click_button("Materialize all…", escape_overlays=True)
    wait_for(lambda: browser.find_elements(By.XPATH, "//*[contains(text(),'Select a partition or create one')]"),
             30, "the partition picker")[0].click()
    wait_for(lambda: [o for o in browser.find_elements(By.XPATH, f"//*[normalize-space(text())='{batch_id}']")
                      if o.is_displayed()], 30, "the batch's partition in the picker")[0].click()
    click_button("Launch 1 run")
    run_link = wait_for(lambda: [a for a in browser.find_elements(By.CSS_SELECTOR, "a[href*='/runs/']")], 30,
                        "the launched run's link")[0]
    run_id = run_link.get_attribute("href").rstrip("/").rsplit("/", 1)[-1]

    # The run page shows the run succeeding, and the instance agrees.
    browser.get(f"http://127.0.0.1:{service.port}/runs/{run_id}")
    wait_for(lambda: browser.find_elements(By.XPATH, "//*[normalize-space(text())='Success']"), 300,
             "the run page to show Success", interval=3,
             explain=lambda: explain_service(service))
    assert run_status(service, run_id) == "SUCCESS"
    assert service.instance.get_run_by_id(run_id).tags["dagster/partition"] == batch_id
    outputs = read_jsonl(service.batch_dir(batch_id) / "results" / "output.jsonl")
    assert [o["custom_id"] for o in outputs] == [line["custom_id"] for line in lines]


# ---- the inbox sensor, the queue, the gpu pool and the model swap -------------------------------

def inbox_runs(service: Service) -> dict[str, list]:
    from dagster import RunsFilter

    runs: dict[str, list] = {}
    for record in service.instance.get_run_records(RunsFilter(tags={"vllm_batch/source": "inbox"})):
        runs.setdefault(record.dagster_run.tags["vllm_batch/inbox_file"], []).append(record.dagster_run)
    return runs


@dataclass
class InboxDrop:
    """Files dropped into the inbox together, and the one run each became."""

    good: dict[str, tuple[str, list[dict]]]  # file name -> (model, request lines)
    bad: dict[str, str]  # file name -> the reason its run must fail with
    runs: dict[str, object]
    taken_while_growing: bool


@pytest.fixture(scope="module")
def inbox_drop(service: Service) -> InboxDrop:
    """Three good batches (models A, B, A) and four bad files arrive at once; wait until every run ended."""
    inbox = service.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    good = {name: (model, [request_line(f"{name[:-6]}-{i}", model) for i in range(12)])
            for name, model in (("grown-a.jsonl", MODEL_A), ("b.jsonl", MODEL_B), ("a.jsonl", MODEL_A))}
    bad = {
        "not-json.jsonl": ("hello world\nthis is not JSON\n", "not JSONL"),
        "empty.jsonl": ("\n\n", "empty"),
        "unknown.jsonl": (json.dumps(request_line("u-1", "no-such-model")) + "\n", "unknown model 'no-such-model'"),
        "mixed.jsonl": ("".join(json.dumps(request_line(f"m-{i}", m)) + "\n" for i, m in enumerate((MODEL_A, MODEL_B))),
                        "mixes models (tiny-llama, tiny-llama-b)"),
    }

    # One file is written in place, a line every 0.3 s (over two sensor ticks): it must not be taken
    # half-written. (A writer that pauses longer than a tick must use the rename.)
    taken_while_growing = False
    model, lines = good["grown-a.jsonl"]
    with (inbox / "grown-a.jsonl").open("w") as handle:
        for line in lines:
            handle.write(json.dumps(line) + "\n")
            handle.flush()
            time.sleep(0.3)
            taken_while_growing |= "grown-a.jsonl" in inbox_runs(service)
    # The others arrive the recommended way: written under another name, then renamed.
    texts = {name: "".join(json.dumps(line) + "\n" for line in lines) for name, (_, lines) in good.items()
             if name != "grown-a.jsonl"}
    texts.update({name: text for name, (text, _) in bad.items()})
    for name, text in texts.items():
        (inbox / f".{name}.part").write_text(text)
    for name in texts:
        (inbox / f".{name}.part").rename(inbox / name)

    wait_for(lambda: set(inbox_runs(service)) >= {*good, *bad}, 90, "a run for every inbox file")
    runs = {name: found[0] for name, found in inbox_runs(service).items()}
    for run in runs.values():
        wait_terminal(service, run.run_id, 600)
    return InboxDrop(good, {name: reason for name, (_, reason) in bad.items()}, runs, taken_while_growing)


def test_inbox_takes_each_complete_file_once_and_rejects_bad_files_clearly(service: Service, inbox_drop: InboxDrop):
    inbox = service.inbox
    assert not inbox_drop.taken_while_growing, "a file that was still being written was taken"
    for name, reason in inbox_drop.bad.items():
        run = inbox_drop.runs[name]
        assert run_status(service, run.run_id) == "FAILURE", name
        failures = [e for e in service.instance.all_logs(run.run_id)
                    if e.dagster_event and e.dagster_event.event_type_value == "STEP_FAILURE"]
        assert failures and reason in failures[0].dagster_event.step_failure_data.error.message, name
        batch_id = run.tags["vllm_batch/batch_id"]
        assert reason in (inbox / "rejected" / f"{batch_id}.reason.txt").read_text()
        assert (inbox / "rejected" / f"{batch_id}.jsonl").exists()

    for name, (model, lines) in inbox_drop.good.items():
        run = inbox_drop.runs[name]
        assert run_status(service, run.run_id) == "SUCCESS", name
        batch_id = run.tags["vllm_batch/batch_id"]
        outputs = read_jsonl(service.batch_dir(batch_id) / "results" / "output.jsonl")
        assert [o["custom_id"] for o in outputs] == [line["custom_id"] for line in lines]  # the whole file
        assert {o["response"]["body"]["model"] for o in outputs} == {model}
        assert (inbox / "processed" / f"{batch_id}.jsonl").exists()

    # Every file left the inbox and ran exactly once, though the sensor saw some on later ticks.
    wait_for(lambda: not list(inbox.glob("*.jsonl")), 30, "the inbox to be emptied")
    time.sleep(5)
    runs_per_file = {name: len(r) for name, r in inbox_runs(service).items()}
    assert runs_per_file == dict.fromkeys([*inbox_drop.good, *inbox_drop.bad], 1)


def test_batches_queue_with_one_gpu_step_at_a_time_and_models_swap(service: Service, inbox_drop: InboxDrop):
    runs = {name: inbox_drop.runs[name] for name in inbox_drop.good}
    steps = {name: step_events(service, run.run_id, "batch_chunks") for name, run in runs.items()}
    spans = sorted((events["STEP_START"], events["STEP_SUCCESS"], name) for name, events in steps.items())
    for (_, previous_end, _), (next_start, _, _) in zip(spans, spans[1:], strict=False):
        assert next_start >= previous_end, f"two gpu steps overlapped: {spans}"

    # Every hand-over: the previous engine was released before the next batch started loading.
    swaps = []
    for (_, _, previous), (_, _, following) in zip(spans, spans[1:], strict=False):
        released = log_time(service, runs[previous].run_id, "engine released")
        start = step_events(service, runs[following].run_id, "batch_chunks")["STEP_START"]
        ready = log_time(service, runs[following].run_id, "engine for")
        last_chunk = max(e.timestamp for e in service.instance.all_logs(runs[previous].run_id)
                         if "written (" in (e.user_message or ""))
        assert released is not None and ready is not None and released <= start
        swaps.append({"from": inbox_drop.good[previous][0], "to": inbox_drop.good[following][0],
                      "release_done_after_s": round(released - last_chunk, 1),
                      "slot_handover_s": round(start - released, 1), "swap_s": round(ready - last_chunk, 1)})
    assert any(swap["from"] != swap["to"] for swap in swaps)  # models A, B, A: at least one real swap
    (service.root / "swap_times.json").write_text(json.dumps(swaps, indent=2))
    print("engine hand-overs:", json.dumps(swaps))


# ---- dagster job launch, cancel, and the schedule ------------------------------------------------

SLOW_CHUNKS = 14


def slow_lines(prefix: str) -> list[dict]:
    # 512 tokens each, four at a time: a few seconds per chunk of 4 on two CPU cores, so that a cancel
    # (up to 15 s from CANCELING to CANCELED on a loaded machine) lands well before the last chunk.
    return [request_line(f"{prefix}-{i}", MODEL_A, max_tokens=512) for i in range(4 * SLOW_CHUNKS)]


def test_job_launch_then_terminate_then_the_schedule_finishes_the_rest(service: Service):
    from dagster import DagsterEventType

    batch_id = "launched"
    lines = slow_lines(batch_id)
    register(service, batch_id, lines, MODEL_A)
    batch_dir = service.batch_dir(batch_id)

    # The command the README gives.
    launched = service.dagster("job", "launch", "-w", str(REPO / "workspace.yaml"), "-j", "batch_job",
                               "--tags", json.dumps({"dagster/partition": batch_id}))
    assert launched.returncode == 0, launched.stderr[-2000:]
    run = wait_for(lambda: service.runs(batch_id), 30, "the launched run")[0]
    assert run.job_name == "batch_job"

    wait_for(lambda: len(chunk_mtimes(batch_dir)) >= 3, 300, "three finished chunks", interval=0.2,
             explain=lambda: explain_service(service))
    # What the UI's Terminate button and `vllm-batch cancel` call: the run coordinator's cancel_run.
    service.instance.run_coordinator.cancel_run(run.run_id)
    assert wait_terminal(service, run.run_id, 60) == "CANCELED"
    events = {e.dagster_event.event_type: e.timestamp for e in service.instance.all_logs(run.run_id)
              if e.dagster_event and e.dagster_event.event_type in
              (DagsterEventType.RUN_CANCELING, DagsterEventType.RUN_CANCELED)}
    stopped_after = events[DagsterEventType.RUN_CANCELED] - events[DagsterEventType.RUN_CANCELING]
    print(f"cancel: the run stopped {stopped_after:.1f}s after CANCELING")  # bounded above by wait_terminal's 60 s
    kept = chunk_mtimes(batch_dir)
    assert 3 <= len(kept) < SLOW_CHUNKS, kept
    time.sleep(3)
    assert chunk_mtimes(batch_dir) == kept, "chunks were still being written after the run was cancelled"
    wait_for(lambda: not engine_processes(service), 30, "the cancelled run's engine processes to exit")
    print(f"terminate -> CANCELED in {stopped_after:.1f}s with {len(kept)}/{SLOW_CHUNKS} chunks kept")
    (service.root / "cancel.json").write_text(json.dumps({"canceling_to_canceled_s": round(stopped_after, 2),
                                                          "chunks_kept": len(kept)}))

    # The schedule notices the unfinished partition and runs it; only the missing chunks are computed.
    started = service.dagster("schedule", "start", "unmaterialised_batches", "-w", str(REPO / "workspace.yaml"))
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        def scheduled():
            return [r for r in service.runs(batch_id) if r.tags.get("vllm_batch/source") == "schedule"]
        rerun = wait_for(scheduled, 150, "the schedule's run", interval=3)[0]
    finally:  # before its next tick, so that it launches nothing for the next test's batches
        service.dagster("schedule", "stop", "unmaterialised_batches", "-w", str(REPO / "workspace.yaml"))
    assert wait_terminal(service, rerun.run_id, 300) == "SUCCESS"
    assert {name: chunk_mtimes(batch_dir)[name] for name in kept} == kept  # finished chunks were not redone
    outputs = read_jsonl(batch_dir / "results" / "output.jsonl")
    assert [o["custom_id"] for o in outputs] == [line["custom_id"] for line in lines]
    materialization = [e for e in service.instance.all_logs(rerun.run_id)
                       if e.dagster_event and e.dagster_event.is_step_materialization
                       and e.step_key == "batch_chunks"][0]
    metadata = materialization.dagster_event.event_specific_data.materialization.metadata
    assert metadata["chunks_resumed"].value == len(kept)
    assert metadata["chunks_run"].value == SLOW_CHUNKS - len(kept)


# ---- crash recovery -----------------------------------------------------------------------------

def live_engine_record(service: Service) -> dict | None:
    from resources.engine_processes import read_records

    for record in read_records(service.data_dir / "engines"):
        if psutil.pid_exists(record["worker"][0]):
            return record
    return None


def dead(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def test_killed_worker_and_daemon_and_postgres_restart_recover_without_a_human(service: Service,
                                                                               postgres_server: ThrowawayPostgres):
    batch_id = "crash"
    lines = slow_lines(batch_id)
    inbox_before = {name: len(r) for name, r in inbox_runs(service).items()}
    submit(service, batch_id, lines, MODEL_A)
    batch_dir = service.batch_dir(batch_id)

    wait_for(lambda: len(chunk_mtimes(batch_dir)) >= 3, 300, "three finished chunks", interval=0.2,
             explain=lambda: explain_service(service))
    record = wait_for(lambda: live_engine_record(service), 10, "the engine record of the run worker")
    worker = psutil.Process(record["worker"][0])
    daemon = next(p for p in psutil.Process(service.process.pid).children()
                  if "dagster-daemon" in " ".join(p.cmdline()))
    first_run = service.runs(batch_id)[0]
    # SIGKILL half-way through the batch, while PostgreSQL is down: the worker's code server notices
    # the death at once and fails to report it (its cleanup thread ends on the database error, for
    # good: a CI soak saw its batch stay in_progress for ever). The daemon goes with it.
    postgres_server.pause()
    try:
        worker.kill()
        daemon.kill()
        wait_for(lambda: dead(worker), 10, "the worker to die")
        time.sleep(12)  # longer than the code server's database retries (5, backing off: about 6 s)
    finally:
        postgres_server.resume()
    before_kill = chunk_mtimes(batch_dir)
    assert 3 <= len(before_kill) < SLOW_CHUNKS
    orphans = [identity[0] for identity in record["engine"]]

    # The restarted daemon's `dead_run_workers` sensor reports the run failed; the run retry resumes it.
    assert wait_terminal(service, first_run.run_id, 180) == "FAILURE"
    wait_for(lambda: any(p.pid != daemon.pid and "dagster-daemon" in " ".join(p.cmdline())
                         for p in psutil.Process(service.process.pid).children()), 30, "the daemon to be restarted")
    retry = wait_for(lambda: [r for r in service.runs(batch_id) if r.run_id != first_run.run_id], 120,
                     "the automatic retry", interval=2)[0]
    assert retry.tags.get("dagster/parent_run_id") == first_run.run_id

    # Once the retry has loaded its engine, the killed worker's engine processes are gone.
    wait_for(lambda: (r := live_engine_record(service)) and r["worker"][0] != worker.pid, 300,
             "the retry's engine", interval=0.5)
    assert not any(psutil.pid_exists(pid) and _name(psutil.Process(pid)).startswith("VLLM") for pid in orphans)

    # Restart PostgreSQL while the retry generates.
    count = len(chunk_mtimes(batch_dir))
    wait_for(lambda: len(chunk_mtimes(batch_dir)) > count, 120, "the retry's first new chunk", interval=0.2)
    postgres_server.restart()
    at_restart = chunk_mtimes(batch_dir)

    wait_for(lambda: any(r.status.value == "SUCCESS" for r in service.runs(batch_id)), 420,
             "the batch to succeed", interval=3)
    after = chunk_mtimes(batch_dir)
    assert len(after) == SLOW_CHUNKS
    assert {name: after[name] for name in before_kill} == before_kill  # not recomputed after the SIGKILL
    assert {name: after[name] for name in at_restart} == at_restart  # nor after the PostgreSQL restart
    outputs = read_jsonl(batch_dir / "results" / "output.jsonl")
    assert sorted(o["custom_id"] for o in outputs) == sorted(line["custom_id"] for line in lines)
    assert len({o["custom_id"] for o in outputs}) == len(lines)  # each exactly once

    # The restarted daemon did not take any inbox file a second time.
    assert {name: len(r) for name, r in inbox_runs(service).items()} == inbox_before
