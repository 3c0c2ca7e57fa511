"""The short fault-injection soak (bench/soak.py): a batch through the API survives SIGKILLs and a PostgreSQL restart.

300 requests on a throwaway PostgreSQL cluster, through `vllm-batch start` and `vllm-batch serve`;
the run worker, the daemon and the API server are each SIGKILLed once at seeded moments and
PostgreSQL is restarted once. Nothing may be lost or duplicated and no finished chunk is written twice.
The soak runs as a user runs it (`python bench/soak.py ...`); the test reads its JSON report.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.files import REPO

pytestmark = pytest.mark.timeout(900)


def test_a_batch_survives_killed_worker_daemon_api_server_and_a_postgres_restart(tmp_path, tiny_model):
    # Long enough outputs, few sequences at a time: the batch is still generating when the kills land.
    output = tmp_path / "soak.json"
    soak = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--requests", "300", "--kills", "3",
                           "--seed", "7", "--chunk-size", "10", "--max-tokens", "128", "--max-num-seqs", "4",
                           "--model", str(tiny_model), "--timeout-s", "600", "--output", str(output)],
                          cwd=REPO, capture_output=True, text=True, timeout=840)
    print(soak.stdout)
    assert output.exists(), soak.stderr[-5000:]
    report = json.loads(output.read_text())

    assert report["status"] == "completed"
    assert {f["target"] for f in report["faults"]} == {"worker", "daemon", "api", "postgres"}
    assert all(f["done"] for f in report["faults"]), report["faults"]  # every fault happened mid-batch
    assert report["restarts"]["daemon"] >= 1 and report["restarts"]["api_server"] == 1
    assert report["restarts"]["postgres"] == 1 and report["restarts"]["run_retries"] >= 1
    assert report["lost"] == 0
    assert report["duplicated"] == 0
    assert report["output_lines"] == 300 and report["error_lines"] == 0
    assert report["chunks_written_more_than_once"] == 0 and report["chunk_rewrites_seen_on_disk"] == 0
    # A worker killed between writing a chunk file and recording its observation leaves one unrecorded.
    assert report["chunk_writes"] + report["chunks_without_observation"] == report["chunks_total"]
    assert soak.returncode == 0, soak.stderr[-5000:]
