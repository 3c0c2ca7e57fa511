"""The integration seam: integrations are merged when switched on, absent when off, and never fail a batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batch_pipeline.domain.settings import Settings, adopt_legacy_environment
from batch_pipeline.orchestration.definitions import build_definitions
from batch_pipeline.orchestration.enabled_integrations import Integration, IntegrationError, check_integrations
from tests.support.files import REPO, read_jsonl, write_jsonl

EXAMPLE = "examples.integrations.batch_digest.definitions"
FAILING = "tests.integration_examples.failing"


def asset_names(settings: Settings) -> set[str]:
    return {key.to_user_string() for key in build_definitions(settings).resolve_all_asset_keys()}


def test_no_integration_is_loaded_by_default():
    defs = build_definitions(Settings(home=REPO))
    assert asset_names(Settings(home=REPO)) == {"batch_input", "batch_chunks", "batch_results"}
    assert not defs.get_repository_def().has_job("batch_integrations")


def test_an_enabled_integration_is_merged_with_an_automation_sensor():
    settings = Settings(home=REPO, integrations=[EXAMPLE])
    defs = build_definitions(settings)
    assert "batch_digest" in asset_names(settings)
    repo = defs.get_repository_def()
    assert repo.has_job("batch_integrations") and repo.has_sensor_def("integrations_after_results")
    assert not {"batch_digest"} & {k.to_user_string() for k in repo.get_job("batch_job").asset_layer.executable_asset_keys}


def test_an_integration_whose_extra_is_missing_names_the_extra():
    integration = Integration("curation", "integrations.curation.definitions", "curation", ("no_such_package_here",))
    with pytest.raises(IntegrationError, match=r"pip install 'vllm-batch-pipeline\[curation\]'"):
        integration.check_installed()


def test_settings_read_the_integration_lists_comma_separated(monkeypatch):
    monkeypatch.setenv("VBATCH_INTEGRATIONS", f" {EXAMPLE} , {FAILING} ")
    monkeypatch.setenv("VBATCH_RESULT_HANDLERS", "")
    settings = Settings(home=REPO)
    assert settings.integrations == [EXAMPLE, FAILING] and settings.result_handlers == []
    check_integrations(settings)  # both importable: no error


def test_old_setting_names_are_moved_to_the_new_prefix_with_a_warning(caplog):
    environ = {"VLLM_BATCH_CHUNK_SIZE": "7", "VLLM_BATCH_DTYPE": "float32", "VBATCH_DTYPE": "bfloat16",
               "VLLM_CPU_KVCACHE_SPACE": "1"}
    moved = adopt_legacy_environment(environ)
    assert moved == ["VLLM_BATCH_CHUNK_SIZE", "VLLM_BATCH_DTYPE"]
    # The new name wins; the old ones leave the environment, so vLLM has no unknown VLLM_* to warn about.
    assert environ == {"VBATCH_CHUNK_SIZE": "7", "VBATCH_DTYPE": "bfloat16", "VLLM_CPU_KVCACHE_SPACE": "1"}
    assert [r.getMessage() for r in caplog.records] == [
        "VLLM_BATCH_CHUNK_SIZE is deprecated: set VBATCH_CHUNK_SIZE instead",
        "VLLM_BATCH_DTYPE is deprecated: set VBATCH_DTYPE instead"]


def run_batch(settings, instance, tiny_model: Path, batch_id: str):
    from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process

    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny-llama", "prompt": f"item {i}", "max_tokens": 4, "temperature": 0}}
             for i in range(20)]
    path = write_jsonl(settings.resolved_data_dir.parent / f"{batch_id}.jsonl", lines)
    spec = register_local_batch(settings, instance, path, str(tiny_model), "tiny-llama", batch_id=batch_id)
    return run_batch_in_process(settings, instance, spec.batch_id)


def test_the_example_integration_runs_after_the_batch(settings, sqlite_instance, tiny_model, loaded_engine):
    settings = settings.model_copy(update={"integrations": [EXAMPLE]})
    result = run_batch(settings, sqlite_instance, tiny_model, "digest")
    assert result.success and result.integration_error is None
    digest = json.loads((result.paths.results_dir / "digest.json").read_text())
    assert digest["finish_reasons"] == {"length": 20}
    from dagster import AssetKey

    event = sqlite_instance.get_latest_materialization_event(AssetKey("batch_digest"))
    assert event is not None and event.dagster_event.partition == "digest"


def test_a_failing_integration_leaves_the_batch_complete(settings, sqlite_instance, tiny_model, loaded_engine):
    settings = settings.model_copy(update={"integrations": [FAILING]})
    result = run_batch(settings, sqlite_instance, tiny_model, "fails-after")
    assert result.success, result.error
    assert result.integration_error == "the destination for fails-after refused the upload"
    assert len(read_jsonl(result.paths.output)) == 20 and result.summary["completed"] == 20
    from dagster import AssetKey, DagsterRunStatus, RunsFilter

    runs = sqlite_instance.get_runs(RunsFilter(tags={"dagster/partition": "fails-after"}))
    assert sorted(run.job_name for run in runs) == ["batch_integrations", "batch_job"]
    assert {run.job_name: run.status for run in runs}["batch_job"] == DagsterRunStatus.SUCCESS
    assert sqlite_instance.get_latest_materialization_event(AssetKey("batch_results")) is not None


def core_only_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VBATCH_", "VLLM_BATCH_"))}
    env.update(PYTHONPATH=f"{REPO / 'tests' / 'data' / 'core_only'}{os.pathsep}{REPO}", VBATCH_DATA_DIR=str(tmp_path / "data"),
               DAGSTER_HOME=str(tmp_path / "dagster"), VBATCH_DTYPE="float32", VBATCH_ENFORCE_EAGER="true",
               VBATCH_MAX_MODEL_LEN="1024", **extra)
    return env


def test_an_enabled_integration_without_its_extra_stops_with_one_line(tmp_path):
    env = core_only_env(tmp_path, VBATCH_ENABLE_CURATION="true")
    result = subprocess.run([sys.executable, "-m", "batch_pipeline.entrypoints.cli", "list"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the curation integration is enabled but needs the 'curation' extra (missing label_studio_sdk): "
        "pip install 'vllm-batch-pipeline[curation]'")


def test_the_core_loads_and_runs_a_batch_without_any_integration_package(tmp_path, tiny_model):
    env = core_only_env(tmp_path)
    probe = "import boto3"
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode != 0
    load = subprocess.run([sys.executable, "-c", "from batch_pipeline.orchestration.definitions import defs; "
                           "print(len(list(defs.resolve_all_asset_keys())))"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert load.returncode == 0 and load.stdout.strip() == "3", load.stderr[-2000:]
    path = write_jsonl(tmp_path / "core.jsonl", [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": f"core {i}", "max_tokens": 3, "temperature": 0}} for i in range(5)])
    run = subprocess.run([sys.executable, "-m", "batch_pipeline.entrypoints.cli", "run", str(path), "--model", str(tiny_model),
                          "--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout[run.stdout.index("{"):])
    assert summary["completed"] == 5 and summary["failed"] == 0
