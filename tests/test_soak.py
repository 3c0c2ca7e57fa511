"""The short fault-injection soak (bench/soak.py): a batch through the API survives SIGKILLs and a PostgreSQL restart.

300 requests on a throwaway PostgreSQL cluster, through `vllm-batch start` and `vllm-batch serve`;
the run worker, the daemon and the API server are each SIGKILLed once at seeded moments and
PostgreSQL is restarted once. Nothing may be lost or duplicated and no finished chunk is written twice.
"""

from __future__ import annotations

import json

import pytest

from bench.soak import SoakParams, run_soak

pytestmark = pytest.mark.timeout(900)


def test_a_batch_survives_killed_worker_daemon_api_server_and_a_postgres_restart(tmp_path, tiny_model):
    # Long enough outputs, few sequences at a time: the batch is still generating when the kills land.
    params = SoakParams(requests=300, kills=3, seed=7, chunk_size=10, max_tokens=128, max_num_seqs=4,
                        restart_postgres=True, model=str(tiny_model), timeout_s=600)
    report = run_soak(params, tmp_path, echo=print)
    print(json.dumps({k: v for k, v in report.__dict__.items() if k != "params"}, indent=1, default=str))

    assert report.status == "completed"
    assert {f["target"] for f in report.faults} == {"worker", "daemon", "api", "postgres"}
    assert all(f["done"] for f in report.faults), report.faults  # every fault happened mid-batch
    assert report.restarts["daemon"] >= 1 and report.restarts["api_server"] == 1
    assert report.restarts["postgres"] == 1 and report.restarts["run_retries"] >= 1
    assert report.lost == 0
    assert report.duplicated == 0
    assert report.output_lines == 300 and report.error_lines == 0
    assert report.chunks_written_more_than_once == 0 and report.chunk_rewrites_seen_on_disk == 0
    # A worker killed between writing a chunk file and recording its observation leaves one unrecorded.
    assert report.chunk_writes + report.chunks_without_observation == report.chunks_total
