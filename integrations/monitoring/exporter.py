"""The scrape endpoint of `vllm-batch start`: batch metrics from the instance, GPU, and vLLM's own metrics."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from batch_pipeline.domain.settings import Settings
from integrations.monitoring.batch_events import BatchEventFollower
from integrations.monitoring.engine_metrics import EngineMetricsCollector, prepare_worker_environment
from integrations.monitoring.gpu import GpuCollector
from integrations.monitoring.metrics import BatchMetrics

log = logging.getLogger(__name__)


def engine_metrics_dir(settings: Settings) -> Path:
    """Where run workers write vLLM's metrics (VBATCH_METRICS_DIR, default DATA_DIR/metrics)."""
    return (settings.metrics_dir or settings.resolved_data_dir / "metrics").resolve()


class MetricsExporter:
    """Serves /metrics on settings.metrics_host:metrics_port and keeps the batch metrics up to date."""

    def __init__(self, settings: Settings, instance=None):
        self.settings = settings
        self.registry = CollectorRegistry()
        self.metrics = BatchMetrics(self.registry)
        self.gpu = GpuCollector()
        self.registry.register(self.gpu)
        self._instance = instance
        self._stop = threading.Event()
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.follower: BatchEventFollower | None = None
        self.engine_metrics = False

    def start(self, with_engine_metrics: bool = True) -> MetricsExporter:
        """Bind the endpoint, point the workers started after this at the metrics folder, start polling."""
        self._server = serve_text_format(self.registry, self.settings.metrics_host, self.settings.metrics_port)
        if with_engine_metrics:
            folder = engine_metrics_dir(self.settings)
            self.engine_metrics = prepare_worker_environment(folder)
            if self.engine_metrics:
                self.registry.register(EngineMetricsCollector(folder))
        if self._instance is None:
            from batch_pipeline.domain.instance import open_instance

            self._instance = open_instance(self.settings)
        self.follower = BatchEventFollower(self._instance, self.settings.resolved_data_dir, self.metrics)
        self._thread = threading.Thread(target=self._run, name="metrics-poll", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        """The scrape URL."""
        return f"http://{self.settings.metrics_host}:{self.settings.metrics_port}/metrics"

    def _run(self) -> None:
        assert self.follower is not None
        while not self._stop.is_set():
            self.follower.poll()
            self._stop.wait(self.settings.metrics_poll_seconds)

    def stop(self) -> None:
        """Stop polling and serving."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - one line per scrape would drown the service's log
        pass


def serve_text_format(registry: CollectorRegistry, host: str, port: int) -> ThreadingWSGIServer:
    """Serve `registry` on http://host:port/metrics, always in the Prometheus text format, in a thread."""
    app = make_wsgi_app(registry)

    def text_format_app(environ, start_response):
        # Prometheus asks for OpenMetrics first, and prometheus_client's OpenMetrics writer turns the
        # ':' of vLLM's names into '_' (vllm:num_requests_running -> vllm_num_requests_running). The
        # text format keeps vLLM's own names, which its dashboards and ours query.
        environ["HTTP_ACCEPT"] = "text/plain; version=0.0.4"
        return app(environ, start_response)

    server = make_server(host, port, text_format_app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def start_exporter(settings: Settings, echo=print) -> MetricsExporter | None:
    """What `vllm-batch start` calls when monitoring is on: the exporter, or None (and one line) if it cannot bind."""
    try:
        exporter = MetricsExporter(settings).start()
    except OSError as exc:
        # Monitoring must never stop batches: the service runs on without the endpoint.
        echo(f"warning: metrics endpoint not started on {settings.metrics_host}:{settings.metrics_port}: {exc}")
        return None
    echo(f"metrics: {exporter.url}" + ("" if exporter.engine_metrics else " (without vLLM's engine metrics)"))
    return exporter
