"""The batch metrics, by the names that the dashboards and alert rules rely on, in one registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: from a tiny model on a CPU (sub-second) to a large model on a busy GPU queue (hours).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
ENGINE_LOAD_BUCKETS = (1, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600, 1200)
CHUNK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class BatchMetrics:
    """Every metric the exporter serves about batches (GPU and vLLM's own metrics are separate collectors)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter("vbatch_requests", "Requests finished, by model and status (completed, failed).",
                                ["model", "status"], registry=registry)
        self.request_errors = Counter("vbatch_request_errors", "Failed requests by model and error code.",
                                      ["model", "code"], registry=registry)
        self.batches = Counter("vbatch_batches", "Batches ended, by model and status (completed, failed, cancelled, "
                               "expired).", ["model", "status"], registry=registry)
        self.batch_requests = Gauge("vbatch_batch_requests", "Requests of a batch in flight: state=total or done.",
                                    ["batch_id", "state"], registry=registry)
        self.batch_progress = Gauge("vbatch_batch_progress_timestamp_seconds",
                                    "When a batch in flight last finished a chunk (or started generating).",
                                    ["batch_id"], registry=registry)
        self.prompt_tokens = Counter("vbatch_prompt_tokens", "Prompt tokens of finished requests.", ["model"],
                                     registry=registry)
        self.generation_tokens = Counter("vbatch_generation_tokens", "Generated tokens of finished requests.",
                                         ["model"], registry=registry)
        self.batch_duration = Histogram("vbatch_batch_duration_seconds", "A batch run's duration, start to end.",
                                        ["model"], buckets=DURATION_BUCKETS, registry=registry)
        self.queue_wait = Histogram("vbatch_queue_wait_seconds",
                                    "From a batch's run being queued until batch_chunks holds the gpu pool.",
                                    buckets=DURATION_BUCKETS, registry=registry)
        self.engine_load = Histogram("vbatch_engine_load_seconds", "Engine loads: seconds until vLLM was ready.",
                                     ["model"], buckets=ENGINE_LOAD_BUCKETS, registry=registry)
        self.engine_load_failures = Counter("vbatch_engine_load_failures", "Engine loads that failed.", ["model"],
                                            registry=registry)
        self.engine_swaps = Counter("vbatch_engine_swaps", "Engine loads of a model other than the one loaded before.",
                                    registry=registry)
        self.chunk_write = Histogram("vbatch_chunk_write_seconds",
                                     "Seconds from one chunk written to the next one written, within a run.",
                                     buckets=CHUNK_BUCKETS, registry=registry)
        self.queue_depth = Gauge("vbatch_queue_depth", "Batches queued, or running but waiting for the gpu pool.",
                                 registry=registry)
        self.exporter_errors = Counter("vbatch_exporter_errors", "Polls of the Dagster instance that failed.",
                                       registry=registry)
        self.exporter_poll = Gauge("vbatch_exporter_last_poll_timestamp_seconds",
                                   "When the exporter last read the Dagster instance successfully.", registry=registry)
