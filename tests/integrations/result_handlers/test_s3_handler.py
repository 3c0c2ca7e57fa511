"""S3Handler against a real SeaweedFS: objects, checksums, multipart, a re-run that uploads nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.integrations.result_handlers.conftest import delivered

S3_HANDLER = "integrations.result_handlers.s3_handler.S3Handler"


@pytest.fixture
def bucket(s3_env: str, request) -> str:
    import boto3

    name = "vbatch-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:10]
    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket=name)
    return name


def s3(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def test_large_batch_lands_with_checksums_and_a_rerun_uploads_nothing(settings, sqlite_instance, finished_batch,
                                                                        s3_env, bucket, materialize_handler):
    root = finished_batch("big-batch", output_bytes=100 * 1024 * 1024)
    output = root / "results" / "output.jsonl"
    assert output.stat().st_size >= 100 * 1024 * 1024

    result = materialize_handler(settings, sqlite_instance, "big-batch", result_handlers=[S3_HANDLER],
                                 s3_bucket=bucket, s3_prefix="runs/2026", s3_endpoint_url=s3_env)
    assert result.success
    meta = delivered(result)
    files = {item["name"]: item for item in meta["files"]}
    assert set(files) == {"output.jsonl", "errors.jsonl", "results.parquet", "summary.json", "manifest.json"}
    assert all(item["transferred"] for item in files.values())
    assert files["output.jsonl"]["uri"] == f"s3://{bucket}/runs/2026/big-batch/output.jsonl"

    client = s3(s3_env)
    head = client.head_object(Bucket=bucket, Key="runs/2026/big-batch/output.jsonl")
    assert head["ContentLength"] == output.stat().st_size
    assert "-" in head["ETag"], "a 100 MB file goes up in parts"
    digest = hashlib.sha256()
    for block in client.get_object(Bucket=bucket, Key="runs/2026/big-batch/output.jsonl")["Body"].iter_chunks(1 << 20):
        digest.update(block)
    assert digest.hexdigest() == files["output.jsonl"]["sha256"] == meta["output.jsonl sha256"]
    manifest = json.loads(client.get_object(Bucket=bucket, Key="runs/2026/big-batch/manifest.json")["Body"].read())
    assert manifest["batch_id"] == "big-batch" and manifest["metadata"] == {"team": "search"}
    assert manifest["files"]["output.jsonl"]["sha256"] == files["output.jsonl"]["sha256"]

    again = materialize_handler(settings, sqlite_instance, "big-batch", result_handlers=[S3_HANDLER],
                                s3_bucket=bucket, s3_prefix="runs/2026", s3_endpoint_url=s3_env)
    assert again.success
    meta = delivered(again)
    assert meta["transferred_files"] == 0 and meta["transferred_bytes"] == 0
    assert client.head_object(Bucket=bucket, Key="runs/2026/big-batch/output.jsonl")["LastModified"] == head["LastModified"]


def test_a_changed_file_is_uploaded_again_and_only_it(settings, sqlite_instance, finished_batch, s3_env, bucket,
                                                      materialize_handler):
    root = finished_batch("b2")
    options = {"result_handlers": ["s3"], "s3_bucket": bucket, "s3_endpoint_url": s3_env}
    assert materialize_handler(settings, sqlite_instance, "b2", **options).success
    (root / "results" / "errors.jsonl").write_text("")
    meta = delivered(materialize_handler(settings, sqlite_instance, "b2", **options))
    moved = sorted(item["name"] for item in meta["files"] if item["transferred"])
    assert moved == ["errors.jsonl", "manifest.json"]
    assert s3(s3_env).head_object(Bucket=bucket, Key="b2/errors.jsonl")["ContentLength"] == 0


def test_a_missing_bucket_fails_the_handler_at_once_and_leaves_the_results_alone(settings, sqlite_instance,
                                                                                 finished_batch, s3_env, materialize_handler):
    root = finished_batch("b3")
    before = {path.name: path.read_bytes() for path in (root / "results").iterdir()}
    result = materialize_handler(settings, sqlite_instance, "b3", result_handlers=["s3"], s3_bucket="no-such-bucket",
                                 s3_endpoint_url=s3_env)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "no-such-bucket" in failure.event_specific_data.error.message
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"], "a refusal is not retried"
    assert {path.name: path.read_bytes() for path in (root / "results").iterdir()} == before


def test_a_missing_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch):
    import importlib.util

    from batch_pipeline.domain.settings import Settings
    from batch_pipeline.orchestration.enabled_integrations import IntegrationError, check_integrations

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "boto3" else real(name, *a))
    with pytest.raises(IntegrationError, match=r"needs the 's3' extra \(missing boto3\).*vllm-batch-pipeline\[s3\]"):
        check_integrations(Settings(home=Path.cwd(), result_handlers="s3", s3_bucket="b"))


def test_a_handler_without_its_bucket_setting_is_one_line():
    from batch_pipeline.domain.settings import Settings
    from batch_pipeline.orchestration.enabled_integrations import IntegrationError, check_integrations

    with pytest.raises(IntegrationError, match="the s3 result handler is not configured: .*VBATCH_S3_BUCKET"):
        check_integrations(Settings(home=Path.cwd(), result_handlers="s3"))
