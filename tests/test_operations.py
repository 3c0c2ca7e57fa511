"""Operating the pipeline the way Dagster users do, against a live `vllm-batch start` on PostgreSQL.

One service (webserver + daemon, started by `vllm-batch start`) serves the whole module; every test
drives it from outside: the inbox folder, queue tickets, `dagster job launch`, `dagster schedule
start`, the webserver's GraphQL API (what the UI's Terminate button calls), a real headless Chromium,
SIGKILL and a PostgreSQL restart. Runs execute the real CPU vLLM engine on the tiny model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.support.files import REPO, read_jsonl
from tests.support.postgres import ThrowawayPostgres
from tests.support.processes import daemons_of, process_name
from tests.support.request_lines import item_line
from tests.support.service import (
    HELD_CHUNKS,
    MODEL_A,
    MODEL_B,
    Service,
    chunk_mtimes,
    dead,
    engine_processes,
    explain_service,
    held_lines,
    log_time,
    register,
    run_status,
    start_service,
    step_events,
    submit,
    wait_terminal,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def service(postgres_server: ThrowawayPostgres, tmp_path_factory, tiny_model: Path) -> Iterator[Service]:
    """`vllm-batch start` on a PostgreSQL server of its own, with its own data folder and a second model."""
    with start_service(tmp_path_factory.mktemp("operations"), postgres_server.url, tiny_model) as running:
        yield running


@pytest.fixture(autouse=True)
def released(service: Service) -> Iterator[None]:
    """No test leaves the service's runs held (`Service.hold`)."""
    yield
    service.release()


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
    lines = [item_line(f"ui-{i}", MODEL_A) for i in range(10)]
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
    good = {name: (model, [item_line(f"{name[:-6]}-{i}", model) for i in range(12)])
            for name, model in (("grown-a.jsonl", MODEL_A), ("b.jsonl", MODEL_B), ("a.jsonl", MODEL_A))}
    bad = {
        "not-json.jsonl": ("hello world\nthis is not JSON\n", "not JSONL"),
        "empty.jsonl": ("\n\n", "empty"),
        "unknown.jsonl": (json.dumps(item_line("u-1", "no-such-model")) + "\n", "unknown model 'no-such-model'"),
        "mixed.jsonl": ("".join(json.dumps(item_line(f"m-{i}", m)) + "\n" for i, m in enumerate((MODEL_A, MODEL_B))),
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

def test_job_launch_then_terminate_then_the_schedule_finishes_the_rest(service: Service):
    from dagster import DagsterEventType

    batch_id = "launched"
    lines = held_lines(batch_id)
    register(service, batch_id, lines, MODEL_A)
    batch_dir = service.batch_dir(batch_id)
    # The run waits after each chunk while held (released below, or by the fixture's teardown): cancelled
    # half-way on any hardware.
    service.hold()

    # The command the README gives.
    launched = service.dagster("job", "launch", "-w", str(REPO / "workspace.yaml"), "-j", "batch_job",
                               "--tags", json.dumps({"dagster/partition": batch_id}))
    assert launched.returncode == 0, launched.stderr[-2000:]
    run = wait_for(lambda: service.runs(batch_id), 30, "the launched run")[0]
    assert run.job_name == "batch_job"

    wait_for(lambda: chunk_mtimes(batch_dir), 300, "a finished chunk", interval=0.2,
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
    assert 1 <= len(kept) < HELD_CHUNKS, kept
    service.release()  # a run that survived the cancel would now write its other chunks
    time.sleep(3)
    assert chunk_mtimes(batch_dir) == kept, "chunks were still being written after the run was cancelled"
    wait_for(lambda: not engine_processes(service), 30, "the cancelled run's engine processes to exit")
    print(f"terminate -> CANCELED in {stopped_after:.1f}s with {len(kept)}/{HELD_CHUNKS} chunks kept")
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
    assert metadata["chunks_run"].value == HELD_CHUNKS - len(kept)


# ---- crash recovery -----------------------------------------------------------------------------

def live_engine_record(service: Service) -> dict | None:
    from resources.engine_processes import read_records

    for record in read_records(service.data_dir / "engines"):
        if psutil.pid_exists(record["worker"][0]):
            return record
    return None


def test_killed_worker_and_daemon_and_postgres_restart_recover_without_a_human(service: Service,
                                                                               postgres_server: ThrowawayPostgres):
    batch_id = "crash"
    lines = held_lines(batch_id)
    inbox_before = {name: len(r) for name, r in inbox_runs(service).items()}
    service.hold()  # each run waits after each chunk until released below
    submit(service, batch_id, lines, MODEL_A)
    batch_dir = service.batch_dir(batch_id)

    wait_for(lambda: chunk_mtimes(batch_dir), 300, "a finished chunk", interval=0.2,
             explain=lambda: explain_service(service))
    record = wait_for(lambda: live_engine_record(service), 10, "the engine record of the run worker")
    worker = psutil.Process(record["worker"][0])
    daemon = daemons_of(service.process.pid)[0]
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
    assert 1 <= len(before_kill) < HELD_CHUNKS
    orphans = [identity[0] for identity in record["engine"]]

    # The restarted daemon's `dead_run_workers` sensor reports the run failed; the run retry resumes it.
    assert wait_terminal(service, first_run.run_id, 180) == "FAILURE"
    wait_for(lambda: [d for d in daemons_of(service.process.pid) if d.pid != daemon.pid], 30,
             "the daemon to be restarted")
    retry = wait_for(lambda: [r for r in service.runs(batch_id) if r.run_id != first_run.run_id], 120,
                     "the automatic retry", interval=2)[0]
    assert retry.tags.get("dagster/parent_run_id") == first_run.run_id

    # Once the retry has loaded its engine, the killed worker's engine processes are gone.
    wait_for(lambda: (r := live_engine_record(service)) and r["worker"][0] != worker.pid, 300,
             "the retry's engine", interval=0.5)
    assert not any(psutil.pid_exists(pid) and process_name(psutil.Process(pid)).startswith("VLLM") for pid in orphans)

    # Restart PostgreSQL while the retry generates.
    count = len(chunk_mtimes(batch_dir))
    wait_for(lambda: len(chunk_mtimes(batch_dir)) > count, 120, "the retry's first new chunk", interval=0.2)
    postgres_server.restart()
    at_restart = chunk_mtimes(batch_dir)
    service.release()

    wait_for(lambda: any(r.status.value == "SUCCESS" for r in service.runs(batch_id)), 420,
             "the batch to succeed", interval=3)
    after = chunk_mtimes(batch_dir)
    assert len(after) == HELD_CHUNKS
    assert {name: after[name] for name in before_kill} == before_kill  # not recomputed after the SIGKILL
    assert {name: after[name] for name in at_restart} == at_restart  # nor after the PostgreSQL restart
    outputs = read_jsonl(batch_dir / "results" / "output.jsonl")
    assert sorted(o["custom_id"] for o in outputs) == sorted(line["custom_id"] for line in lines)
    assert len({o["custom_id"] for o in outputs}) == len(lines)  # each exactly once

    # The restarted daemon did not take any inbox file a second time.
    assert {name: len(r) for name, r in inbox_runs(service).items()} == inbox_before
