"""GPU utilisation and memory per device, read through NVML at scrape time; nothing at all without a GPU."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class GpuCollector(Collector):
    """`vbatch_gpu_utilization_ratio`, `vbatch_gpu_memory_used_bytes`, `vbatch_gpu_memory_total_bytes` per GPU.

    Absent, not zero, where NVML is missing (no NVIDIA driver, no `nvidia-ml-py`): a dashboard then
    shows "no data" on a CPU machine instead of a GPU that looks idle.
    """

    def __init__(self) -> None:
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # no driver, no library, no GPU: all mean "no GPU metrics"
            log.info("monitoring: no GPU metrics (%s)", type(exc).__name__)

    @property
    def available(self) -> bool:
        """Whether NVML answered at start-up."""
        return self._nvml is not None

    def collect(self) -> Iterator[Metric]:
        if self._nvml is None:
            return
        nvml = self._nvml
        utilization = GaugeMetricFamily("vbatch_gpu_utilization_ratio", "GPU busy time over the last sample (0-1).",
                                        labels=["gpu", "name"])
        used = GaugeMetricFamily("vbatch_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu", "name"])
        total = GaugeMetricFamily("vbatch_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu", "name"])
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else name
                labels = [str(index), name]
                utilization.add_metric(labels, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric(labels, float(memory.used))
                total.add_metric(labels, float(memory.total))
        except Exception as exc:  # a scrape must not fail because one device did
            log.warning("monitoring: NVML read failed: %s", exc)
        yield from (utilization, used, total)
