"""The monitoring parts that need no running batch: promtool, the flag off, faults, shipped config files."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tests.integrations.monitoring.conftest import need
from tests.support.files import REPO

MONITORING = REPO / "integrations" / "monitoring"


def test_alert_rules_pass_promtool_check_and_unit_tests():
    folder = MONITORING / "prometheus"
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"],
                 ["check", "config", "prometheus.yml"]):
        done = subprocess.run([need("promtool"), *args], cwd=folder, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_with_the_flag_off_prometheus_client_is_never_imported(tmp_path: Path):
    code = ("import sys; import batch_pipeline.entrypoints.cli, batch_pipeline.entrypoints.supervisor; "
            "from batch_pipeline.orchestration.definitions import defs;"
            "assert 'prometheus_client' not in sys.modules, 'imported'; print(len(defs.assets or []))")
    env = {"PATH": "/usr/bin:/bin", "VBATCH_HOME": str(REPO), "VBATCH_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_with_the_flag_off_the_api_server_imports_no_prometheus_client_and_serves_no_metrics(tmp_path: Path):
    code = ("import sys; from fastapi.testclient import TestClient; from batch_pipeline.entrypoints.api.app import create_app;"
            "from batch_pipeline.domain.settings import Settings; app = create_app(Settings(api_keys='k'));"
            "assert 'prometheus_client' not in sys.modules, 'imported';"
            "assert TestClient(app).get('/metrics', headers={'Authorization': 'Bearer k'}).status_code == 404")
    env = {"PATH": "/usr/bin:/bin", "VBATCH_HOME": str(REPO), "VBATCH_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_with_the_flag_on_the_definitions_still_import_no_prometheus_client(tmp_path: Path):
    # The code server and run workers load the definitions: they must not start metrics of their own.
    code = ("import sys; from batch_pipeline.orchestration.definitions import defs;"
            "assert defs.resolve_assets_def('batch_run_stats'); assert 'prometheus_client' not in sys.modules")
    env = {"PATH": "/usr/bin:/bin", "VBATCH_HOME": str(REPO), "VBATCH_DATA_DIR": str(tmp_path),
           "VBATCH_ENABLE_MONITORING": "true"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_busy_port_leaves_the_service_running_without_the_endpoint(tmp_path: Path):
    from batch_pipeline.domain.settings import Settings
    from integrations.monitoring.exporter import start_exporter

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        lines: list[str] = []
        settings = Settings(home=REPO, data_dir=tmp_path, metrics_port=port)
        assert start_exporter(settings, echo=lines.append) is None
    assert "metrics endpoint not started" in lines[0]


def test_an_unusable_metrics_folder_leaves_the_workers_environment_alone(tmp_path: Path):
    from integrations.monitoring.engine_metrics import prepare_worker_environment

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    environ = {"VBATCH_ENGINE_ARGS": '{"seed": 1}'}
    assert prepare_worker_environment(blocked / "metrics", environ) is False
    assert environ == {"VBATCH_ENGINE_ARGS": '{"seed": 1}'}
    ok = {"VBATCH_ENGINE_ARGS": '{"seed": 1}'}
    assert prepare_worker_environment(tmp_path / "metrics", ok) is True
    assert json.loads(ok["VBATCH_ENGINE_ARGS"]) == {"seed": 1, "disable_log_stats": False}
    assert ok["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "metrics")


def test_dashboards_are_grafana_json_with_a_prometheus_query_in_every_panel():
    uids = set()
    for path in sorted((MONITORING / "grafana_dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] not in uids and dashboard["title"] and dashboard["schemaVersion"] >= 36
        uids.add(dashboard["uid"])
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in dashboard["panels"]:
            assert panel["datasource"]["type"] == "prometheus" and panel["targets"], (path.name, panel["title"])
            assert all(target["expr"].strip() for target in panel["targets"])
    assert uids == {"vbatch-overview", "vbatch-engine"}


def test_compose_file_mounts_only_files_that_exist():
    compose_path = REPO / "docker" / "compose.monitoring.yaml"
    compose = yaml.safe_load(compose_path.read_text())
    assert {"prometheus", "grafana"} <= set(compose["services"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (compose_path.parent / source).resolve().exists(), f"{name}: {source} does not exist"
    provisioning = MONITORING / "grafana_provisioning"
    for path in provisioning.rglob("*.yaml"):
        yaml.safe_load(path.read_text())
    providers = yaml.safe_load((provisioning / "dashboards" / "vllm-batch.yaml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards/vllm-batch"
