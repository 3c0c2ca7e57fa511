"""The webhook sensor inside a real `dagster-daemon`, SIGKILLed between two attempts of one delivery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.files import REPO
from tests.support.services import start_process
from tests.support.waiting import wait_for

DAEMON = Path(sys.executable).parent / "dagster-daemon"


def start_daemon(env: dict, log: Path) -> subprocess.Popen:
    # Its own process group: SIGKILL takes the daemon and its code server down together, as a crash would.
    return start_process([str(DAEMON), "run", "-w", str(REPO / "workspace.yaml")], env, log, append=True)


def test_daemon_killed_between_attempts_resends_the_same_event(tmp_path, finished_batch, receiver, sqlite_instance):
    from dagster import AssetKey, DagsterInstance, DagsterRun, DagsterRunStatus

    from tests.support.webhook_receiver import SECRET

    receiver.fail_first["/d"] = 1
    data_dir = tmp_path / "data"
    finished_batch("daemon-1")  # in tmp_path/data, registered on the instance in tmp_path/dagster
    home = tmp_path / "dagster"
    env = {**os.environ, "DAGSTER_HOME": str(home), "VBATCH_HOME": str(REPO), "VBATCH_DATA_DIR": str(data_dir),
           "VBATCH_ENABLE_WEBHOOKS": "true", "VBATCH_WEBHOOK_URL": f"{receiver.url}/d",
           "VBATCH_WEBHOOK_SECRET": SECRET, "VBATCH_WEBHOOK_INTERVAL_SECONDS": "1",
           "VBATCH_WEBHOOK_BACKOFF_SECONDS": "4", "VBATCH_INBOX_ENABLED": "false"}
    with DagsterInstance.from_ref(sqlite_instance.get_ref()) as instance:
        instance.add_run(DagsterRun(job_name="batch_job", status=DagsterRunStatus.SUCCESS,
                                    tags={"dagster/partition": "daemon-1"}))
    # The project's instance configuration (threaded sensors, run queue, ...), as `vllm-batch start` installs it.
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    log = tmp_path / "daemon.log"
    events = data_dir / "webhooks" / "events"

    def attempts() -> int:
        records = [json.loads(p.read_text()) for p in events.glob("evt_*.json")] if events.is_dir() else []
        return sum(d["attempts"] for r in records for d in r["deliveries"].values())

    daemon = start_daemon(env, log)
    try:
        wait_for(lambda: attempts() == 1, 120, "the first (failing) attempt", interval=0.2, watch=[daemon], log=log)
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
        assert len(receiver.at("d")) == 1 and receiver.at("d")[0].event is None

        daemon = start_daemon(env, log)
        wait_for(lambda: len(receiver.answered("d")) == 2, 120, "the second attempt", interval=0.2, watch=[daemon],
                 log=log)
        first, second = receiver.at("d")
        assert second.event is not None and second.event.type == "batch.completed"
        assert second.headers["webhook-id"] == first.headers["webhook-id"] and second.body == first.body
        time.sleep(3)
        assert len(receiver.at("d")) == 2, "delivered once, never again"
        # The delivery shows in the UI: an observation on the batch's batch_results partition.
        with DagsterInstance.from_ref(sqlite_instance.get_ref()) as instance:
            records = instance.fetch_observations(AssetKey("batch_results"), limit=10).records
        [observed] = [r.asset_observation for r in records]
        assert observed.partition == "daemon-1" and observed.metadata["webhook_delivery"].value == "delivered"
        assert observed.metadata["webhook_attempts"].value == 2
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
