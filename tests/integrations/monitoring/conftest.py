"""A real Prometheus (Debian's `prometheus`, installed by `make services-monitoring`), one per test session."""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.files import REPO
from tests.support.ports import free_port
from tests.support.services import start_process, stop_processes
from tests.support.waiting import wait_for

ALERTS = REPO / "integrations" / "monitoring" / "prometheus" / "alerts.yml"


def need(binary: str) -> str:
    """The path of a binary from Debian's prometheus package; fails (not skips) when it is missing."""
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed: run `make services-monitoring` (apt-get install prometheus)")
    return path


class Prometheus:
    """A Prometheus server on 127.0.0.1 with its own config and data folder; targets are added at run time."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.targets = root / "targets.json"
        self.targets.write_text("[]")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "vllm-batch", "scrape_interval": "1s", "scrape_timeout": "1s",
                                "file_sd_configs": [{"files": [str(self.targets)], "refresh_interval": "1s"}]}],
        }
        (root / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = root / "prometheus.log"
        self.process = start_process(
            [need("prometheus"), f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"], os.environ.copy(), self.log)

    def scrape(self, *addresses: str) -> None:
        """Scrape these host:port addresses as job vllm-batch (file service discovery, picked up within ~1 s)."""
        self.targets.write_text(json.dumps([{"targets": list(addresses)}]))

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path>; the `data` member."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        """An instant query's result vector."""
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list:
        """A range query's series."""
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def wait_ready(self, timeout: float = 60) -> None:
        """Until /-/ready answers."""
        def ready() -> bool:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200

        wait_for(ready, timeout, "prometheus to be ready", interval=0.3, watch=[self.process], log=self.log,
                 retry=(OSError,))

    def stop(self) -> None:
        """Terminate the server."""
        stop_processes(self.process, timeout=20)


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory) -> Iterator[Prometheus]:
    """One real Prometheus for the session, scraping whatever a test points it at."""
    server = Prometheus(tmp_path_factory.mktemp("prometheus"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
