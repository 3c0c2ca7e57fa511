"""The Kubernetes deployment files (deploy/k8s/) against the schemas of the code that reads them.

No cluster and no `helm` binary exist here: nothing is deployed or rendered. What is checked is what
Dagster, dagster-k8s and the Kubernetes client would check when they load these files:
- deploy/k8s/dagster-instance.yaml through Dagster's own instance loader and schema;
- its run launcher block through K8sRunLauncher's config schema, and the run pod's container and pod
  spec through dagster-k8s's strict conversion to the Kubernetes client's models;
- deploy/k8s/values.yaml against the chart's JSON schema (vendored in tests/data/dagster-helm/) and
  against the instance file, for every value the chart copies into the instance;
- deploy/k8s/vllm-batch-env.yaml as Kubernetes objects, and its data root as this project's setting.
"""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes.client as k8s
import pytest
import yaml
from dagster._config import validate_config
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.config import dagster_instance_config
from dagster_k8s import K8sRunLauncher
from dagster_k8s.models import k8s_model_from_dict

from tests.support.files import REPO

DEPLOY = REPO / "deploy" / "k8s"
HELM_SCHEMA = REPO / "tests" / "data" / "dagster-helm" / "values.schema.json"
GPU_COUNT = 4  # the example cluster of deploy/k8s/


def load_instance(folder: Path, text: str | None = None) -> dict:
    """The instance config as Dagster loads it from DAGSTER_HOME/dagster.yaml (validated, defaults filled in)."""
    (folder / "dagster.yaml").write_text(text if text is not None else (DEPLOY / "dagster-instance.yaml").read_text())
    config, _ = dagster_instance_config(str(folder))
    return config


def values() -> dict:
    return yaml.safe_load((DEPLOY / "values.yaml").read_text())


def test_the_instance_config_passes_dagsters_instance_schema(tmp_path):
    config = load_instance(tmp_path)
    assert config["storage"]["postgres"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}  # no secret inline
    assert (config["run_launcher"]["module"], config["run_launcher"]["class"]) == ("dagster_k8s", "K8sRunLauncher")
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["pools"] == {"granularity": "op", "default_limit": GPU_COUNT}
    assert config["concurrency"]["runs"]["max_concurrent_runs"] == GPU_COUNT
    assert config["run_retries"]["enabled"] and config["run_monitoring"]["enabled"]


def test_the_run_launcher_config_passes_k8s_run_launchers_schema_and_asks_for_one_gpu(tmp_path):
    launcher = load_instance(tmp_path)["run_launcher"]["config"]
    result = validate_config(K8sRunLauncher.config_type(), launcher)
    assert result.success, result.errors
    run_pod = result.value["run_k8s_config"]
    container = k8s_model_from_dict(k8s.V1Container, {"name": "dagster", **run_pod["container_config"]})
    assert container.resources.limits["nvidia.com/gpu"] == "1" and container.resources.requests["nvidia.com/gpu"] == "1"
    pod = k8s_model_from_dict(k8s.V1PodSpec, {"containers": [{"name": "dagster"}], **run_pod["pod_spec_config"]})
    assert {t.key for t in pod.tolerations} == {"nvidia.com/gpu"}
    assert {v.name for v in pod.volumes} == {m.name for m in container.volume_mounts}
    assert "vllm-batch-env" in launcher["env_config_maps"] and launcher["env_secrets"] == ["vllm-batch-secrets"]


def test_a_wrong_instance_or_pod_config_is_refused(tmp_path):
    text = (DEPLOY / "dagster-instance.yaml").read_text()
    with pytest.raises(DagsterInvalidConfigError):
        load_instance(tmp_path, text.replace("max_concurrent_runs:", "max_concurent_runs:"))
    # The run limit beside `concurrency > pools` belongs under `concurrency`, not the run coordinator.
    with pytest.raises(DagsterInvalidConfigError, match="incompatible"):
        load_instance(tmp_path, text.replace("  class: QueuedRunCoordinator\n",
                                             "  class: QueuedRunCoordinator\n  config:\n    max_concurrent_runs: 4\n"))
    launcher = load_instance(tmp_path)["run_launcher"]["config"]
    assert not validate_config(K8sRunLauncher.config_type(), {**launcher, "run_k8s_confg": {}}).success
    with pytest.raises(Exception, match="Unexpected keys"):
        k8s_model_from_dict(k8s.V1Container, {"name": "dagster", "resorces": {"limits": {"nvidia.com/gpu": 1}}})


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def test_the_helm_values_give_the_instance_in_deploy_k8s(tmp_path):
    """What the chart copies from values.yaml into the instance ConfigMap equals dagster-instance.yaml."""
    instance, chart = load_instance(tmp_path), values()
    launcher = chart["runLauncher"]["config"]["k8sRunLauncher"]
    rendered = instance["run_launcher"]["config"]
    assert chart["runLauncher"]["type"] == instance["run_launcher"]["class"]
    assert launcher["runK8sConfig"]["containerConfig"] == rendered["run_k8s_config"]["container_config"]
    assert launcher["runK8sConfig"]["podSpecConfig"] == rendered["run_k8s_config"]["pod_spec_config"]
    assert launcher["jobNamespace"] == rendered["job_namespace"]
    assert launcher["imagePullPolicy"] == rendered["image_pull_policy"]
    assert launcher["loadInclusterConfig"] == rendered["load_incluster_config"]
    assert [m["name"] for m in launcher["envConfigMaps"]] == rendered["env_config_maps"][1:]  # after the chart's own
    assert [s["name"] for s in launcher["envSecrets"]] == rendered["env_secrets"]
    assert chart["serviceAccount"]["name"] == rendered["service_account_name"]

    pools, runs = chart["concurrency"]["pools"], chart["concurrency"]["runs"]
    assert {_snake(k): v for k, v in pools.items()} == instance["concurrency"]["pools"]
    assert {_snake(k): v for k, v in runs.items()} == instance["concurrency"]["runs"]
    assert "maxConcurrentRuns" not in chart["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    daemon = chart["dagsterDaemon"]
    assert {_snake(k): v for k, v in daemon["runMonitoring"].items()} == {
        k: v for k, v in instance["run_monitoring"].items() if k in {_snake(n) for n in daemon["runMonitoring"]}}
    assert {_snake(k): v for k, v in daemon["runRetries"].items()} == instance["run_retries"]
    assert {_snake(k): v for k, v in daemon["sensors"].items()} == instance["sensors"]
    db = instance["storage"]["postgres"]["postgres_db"]
    assert (chart["postgresql"]["postgresqlHost"], chart["postgresql"]["postgresqlDatabase"]) == (db["hostname"], db["db_name"])


def test_the_code_server_loads_this_projects_definitions():
    deployment = values()["dagster-user-deployments"]["deployments"][0]
    args = deployment["dagsterApiGrpcArgs"]
    module, attribute = args[args.index("--module-name") + 1], args[args.index("--attribute") + 1]
    assert (module, attribute) == ("batch_pipeline.orchestration.definitions", "defs")
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    assert (workspace["module_name"], workspace["attribute"]) == (module, attribute)


def _permissive_external_refs(node):
    # The chart's schema points Kubernetes objects (resources, volumes, tolerations, ...) at
    # kubernetesjsonschema.dev, which cannot be fetched here: those parts are left unchecked (the
    # run pod's are checked above through the Kubernetes client's models instead).
    if isinstance(node, dict):
        if str(node.get("$ref", "")).startswith("http"):
            node = {k: v for k, v in node.items() if k != "$ref"}
        return {k: _permissive_external_refs(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_permissive_external_refs(v) for v in node]
    return node


def _without_required(node):
    # values.yaml is an override file: the chart's own values.yaml (not vendored) supplies every
    # required key this file leaves out, so only the keys given are checked (names, types, enums).
    if isinstance(node, dict):
        return {k: _without_required(v) for k, v in node.items() if k != "required"}
    if isinstance(node, list):
        return [_without_required(v) for v in node]
    return node


def _chart_validator(strict_required: bool = False):
    import jsonschema

    schema = _permissive_external_refs(json.loads(HELM_SCHEMA.read_text()))
    return jsonschema.Draft7Validator(schema if strict_required else _without_required(schema))


def test_the_helm_values_pass_the_charts_json_schema():
    validator = _chart_validator()
    errors = sorted(validator.iter_errors(values()), key=lambda e: list(e.path))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_the_charts_schema_refuses_a_misspelt_or_mistyped_value():
    validator = _chart_validator()
    bad = values()
    bad["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["containerConfg"] = {}
    assert not validator.is_valid(bad)
    bad = values()
    bad["runLauncher"]["type"] = "K8sRunLaunchr"
    assert not validator.is_valid(bad)
    bad = values()
    bad["dagster-user-deployments"]["deployments"][0]["port"] = "3030"
    assert not validator.is_valid(bad)


def test_the_shared_environment_manifests_are_kubernetes_objects_with_a_valid_data_root(tmp_path):
    from batch_pipeline.domain.settings import Settings

    documents = list(yaml.safe_load_all((DEPLOY / "vllm-batch-env.yaml").read_text()))
    kinds = {doc["kind"]: doc for doc in documents}
    config_map = k8s_model_from_dict(k8s.V1ConfigMap, {k: v for k, v in kinds["ConfigMap"].items()
                                                        if k not in ("apiVersion", "kind")})
    ours = {name.removeprefix("VBATCH_").lower(): value for name, value in config_map.data.items()
            if name.startswith("VBATCH_")}
    settings = Settings(**{**ours, "home": tmp_path})  # every VBATCH_ value is a valid setting
    assert settings.data_root.startswith("s3://")
    assert not settings.warm_engine  # a run pod ends with its run: no host to keep warm
    names = {doc["metadata"]["name"] for doc in documents}
    launcher = load_instance(tmp_path)["run_launcher"]["config"]
    assert set(launcher["env_config_maps"][1:]) | set(launcher["env_secrets"]) <= names
    assert values()["global"]["postgresqlSecretName"] in names
    for doc in documents:
        if doc["kind"] == "Secret":
            assert set(doc["stringData"].values()) == {"REPLACE_ME"}  # no real secret in the repository
