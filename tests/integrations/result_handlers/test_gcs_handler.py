"""GCSHandler against a real fake-gcs-server: objects, checksums, a re-run that uploads nothing."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.integrations.result_handlers.conftest import gcs_client


@pytest.fixture
def gcs_bucket(gcs_server: str, request) -> str:
    name = "vbatch-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:10]
    gcs_client(gcs_server).create_bucket(name)
    return name


def test_batch_lands_in_gcs_with_checksums_and_a_rerun_uploads_nothing(settings, sqlite_instance, finished_batch,
                                                                       gcs_server, gcs_bucket, materialize_handler):
    root = finished_batch("gcs-batch", output_bytes=20 * 1024 * 1024)
    options = {"result_handlers": ["integrations.result_handlers.gcs_handler.GCSHandler"], "gcs_bucket": gcs_bucket,
               "gcs_prefix": "out", "gcs_endpoint_url": gcs_server}
    result = materialize_handler(settings, sqlite_instance, "gcs-batch", **options)
    assert result.success
    [event] = result.get_asset_materialization_events()
    files = {item["name"]: item for item in event.materialization.metadata["files"].value}
    assert files["output.jsonl"]["uri"] == f"gs://{gcs_bucket}/out/gcs-batch/output.jsonl"
    assert all(item["transferred"] for item in files.values())

    bucket = gcs_client(gcs_server).bucket(gcs_bucket)
    blob = bucket.get_blob("out/gcs-batch/output.jsonl")
    assert blob.size == (root / "results" / "output.jsonl").stat().st_size
    assert blob.metadata["sha256"] == files["output.jsonl"]["sha256"]
    assert hashlib.sha256(blob.download_as_bytes()).hexdigest() == files["output.jsonl"]["sha256"]
    manifest = json.loads(bucket.get_blob("out/gcs-batch/manifest.json").download_as_bytes())
    assert manifest["counts"]["failed"] == 1 and set(manifest["files"]) == set(files) - {"manifest.json"}
    generation = blob.generation

    again = materialize_handler(settings, sqlite_instance, "gcs-batch", **options)
    assert again.success
    [event] = again.get_asset_materialization_events()
    assert event.materialization.metadata["transferred_files"].value == 0
    assert bucket.get_blob("out/gcs-batch/output.jsonl").generation == generation
