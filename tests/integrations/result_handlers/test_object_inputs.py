"""`vllm-batch submit` with s3:// and gs:// inputs, through the real CLI, against SeaweedFS and fake-gcs-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.environment import instance_env
from tests.support.files import REPO

LINES = "".join(json.dumps({"custom_id": f"c-{i}", "method": "POST", "url": "/v1/completions",
                            "body": {"model": "tiny-llama", "prompt": f"item {i}", "max_tokens": 4}}) + "\n"
                for i in range(5))


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batch_pipeline.entrypoints.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def cli_env(tmp_path: Path) -> dict:
    return instance_env(tmp_path)


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_submit_takes_an_object_uri_and_downloads_it_once(scheme, cli_env, tmp_path, tiny_model, request):
    if scheme == "s3":
        import boto3

        endpoint = request.getfixturevalue("s3_env")
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="inputs")
        boto3.client("s3", endpoint_url=endpoint).put_object(Bucket="inputs", Key="day/1/in.jsonl", Body=LINES.encode())
        env = {**cli_env, "VBATCH_S3_ENDPOINT_URL": endpoint, **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")}}
    else:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        endpoint = request.getfixturevalue("gcs_server")
        client = storage.Client(project="t", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
        client.create_bucket("inputs-gs").blob("day/1/in.jsonl").upload_from_string(LINES)
        env = {**cli_env, "VBATCH_GCS_ENDPOINT_URL": endpoint}
    uri = f"{scheme}://inputs{'-gs' if scheme == 'gs' else ''}/day/1/in.jsonl"

    submitted = cli(env, "submit", uri, "--model", str(tiny_model), "--json")
    assert submitted.returncode == 0, submitted.stderr
    batch_id = json.loads(submitted.stdout)["id"]
    spec = json.loads((tmp_path / "data" / "batches" / batch_id / "batch.json").read_text())
    local = Path(spec["input_path"])
    assert local.read_text() == LINES and local.is_relative_to(tmp_path / "data" / "inputs" / scheme)
    mtime = local.stat().st_mtime_ns

    again = cli(env, "submit", uri, "--model", str(tiny_model))
    assert again.returncode == 1 and "already queued" in again.stderr
    assert local.stat().st_mtime_ns == mtime, "an unchanged object is not downloaded again"

    missing = cli(env, "submit", uri.replace("in.jsonl", "nope.jsonl"), "--model", str(tiny_model))
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: cannot read {uri.replace('in.jsonl', 'nope.jsonl')}: no such object"
