"""docker/compose.full.yaml: valid YAML, every file it references present, the handler wired to the store."""

from __future__ import annotations

from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[3] / "docker"


def test_compose_full_references_files_that_exist_and_wires_the_s3_store():
    compose = yaml.safe_load((DOCKER / "compose.full.yaml").read_text())
    services = compose["services"]
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context.is_dir() and (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):  # a bind mount of a file in the repository
                assert (DOCKER / source).exists(), f"{name}: {source}"
            elif not source.startswith("$"):
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    env = services["dagster"]["environment"]
    assert env["VBATCH_RESULT_HANDLERS"] == "s3"
    assert env["VBATCH_S3_ENDPOINT_URL"].startswith("http://seaweedfs:")
    assert services["api"]["environment"]["VBATCH_S3_BUCKET"] == env["VBATCH_S3_BUCKET"]
    assert "gpu,all" in services["dagster"]["build"]["args"]["EXTRAS"]
    # Monitoring and curation beside the store: Prometheus scrapes the service, curation talks to Label Studio.
    assert env["VBATCH_ENABLE_MONITORING"] == "true" and env["VBATCH_ENABLE_CURATION"] == "true"
    assert {"prometheus", "grafana", "label-studio"} <= set(services)
    assert env["VBATCH_LABEL_STUDIO_URL"].startswith("http://label-studio:")
    assert "ARG EXTRAS" in (DOCKER / "Dockerfile").read_text()
