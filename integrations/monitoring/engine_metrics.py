"""vLLM's own engine metrics (`vllm:*`), written by the run workers and served by the long-lived process.

vLLM records its metrics with `prometheus_client` in the process that drives the engine, which is a
run worker that lives for one batch. With `PROMETHEUS_MULTIPROC_DIR` set, `prometheus_client`
keeps them in memory-mapped files in that folder instead, and this collector merges the files
into the exporter's answer. The service sets that variable (and switches vLLM's stats on) for the
processes it starts, so the daemon's run workers inherit it.

The files of a worker that ended are dropped after `keep_seconds`: vLLM's metrics describe a batch
while it runs, and a folder that only grows would fill up over months of batches.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import psutil
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Below this much free space the workers are not pointed at the folder: prometheus_client writes
# through mmap, and a full file system there could take a run worker down with it.
MIN_FREE_BYTES = 64 * 1024 * 1024


def prepare_worker_environment(metrics_dir: Path, environ: MutableMapping[str, str] | None = None) -> bool:
    """Point the processes started from here at `metrics_dir` and turn vLLM's stats on; False if not possible."""
    environ = os.environ if environ is None else environ
    try:
        metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in metrics_dir.glob("*.db"):  # what an earlier service left: those processes are gone
            stale.unlink(missing_ok=True)
        free = shutil.disk_usage(metrics_dir).free
    except OSError as exc:
        log.warning("monitoring: vLLM engine metrics are off: cannot use %s (%s)", metrics_dir, exc)
        return False
    if free < MIN_FREE_BYTES:
        log.warning("monitoring: vLLM engine metrics are off: only %d MiB free in %s", free >> 20, metrics_dir)
        return False
    environ[MULTIPROC_ENV] = str(metrics_dir)
    # vLLM's offline engine keeps no stats unless asked; an explicit choice in VBATCH_ENGINE_ARGS wins.
    engine_args = json.loads(environ.get("VBATCH_ENGINE_ARGS") or "{}")
    engine_args.setdefault("disable_log_stats", False)
    environ["VBATCH_ENGINE_ARGS"] = json.dumps(engine_args)
    return True


def _pid_of(path: str) -> int | None:
    # prometheus_client names its files <type>_<pid>.db or <type>_<mode>_<pid>.db.
    try:
        return int(Path(path).stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return None


class EngineMetricsCollector(Collector):
    """vLLM's metrics from the run workers' files, under vLLM's own names."""

    def __init__(self, metrics_dir: Path, keep_seconds: float = 600.0):
        self.metrics_dir = metrics_dir
        self.keep_seconds = keep_seconds
        self._dead_since: dict[int, float] = {}

    def collect(self) -> Iterator[Metric]:
        try:
            self._prune()
            files = glob.glob(str(self.metrics_dir / "*.db"))
            metrics = list(MultiProcessCollector.merge(files, accumulate=True))
        except Exception as exc:  # a file being written or removed right now: the next scrape sees it
            log.warning("monitoring: reading vLLM's metric files failed: %s", exc)
            return
        yield from metrics

    def _prune(self) -> None:
        now = time.time()
        for path in glob.glob(str(self.metrics_dir / "*.db")):
            pid = _pid_of(path)
            if pid is None or psutil.pid_exists(pid):
                continue
            dead_since = self._dead_since.setdefault(pid, now)
            if now - dead_since >= self.keep_seconds:
                Path(path).unlink(missing_ok=True)
        self._dead_since = {pid: t for pid, t in self._dead_since.items() if now - t < 2 * self.keep_seconds + 60}
