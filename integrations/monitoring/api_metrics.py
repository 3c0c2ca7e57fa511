"""HTTP metrics of the Batch API server (`vllm-batch serve`): request counts by route and status, and latency.

Loaded through the seam only when monitoring is enabled (`api=` for the `/metrics` route,
`api_middleware=` for the measuring middleware), so with the flag off the server never imports
prometheus_client. The metrics live in a registry of their own: the server's `/metrics` shows the API's
figures, the batch metrics stay on `vllm-batch start`'s endpoint.
"""

from __future__ import annotations

import time

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batch_pipeline.domain.settings import Settings

REGISTRY = CollectorRegistry(auto_describe=True)
REQUESTS = Counter("vbatch_api_requests_total", "Batch API requests answered, by route template and status.",
                   ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram("vbatch_api_request_duration_seconds", "Batch API request latency, until the response is sent.",
                    ["method", "route"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))
UNMATCHED = "unmatched"  # any path no route matches: one label value, however many paths scanners try


def _route_of(scope: Scope) -> str:
    # The route's template (`/v1/batches/{batch_id}`), never the raw path, so labels stay few. Matched here
    # rather than read from the scope, because the API-key check answers 401 before routing.
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", UNMATCHED)
    return UNMATCHED


class RequestMetrics:
    """Pure ASGI middleware (outside the API-key check, so refused requests count too)."""

    def __init__(self, app: ASGIApp, settings: Settings | None = None):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception before the response started is answered 500 by the server

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            method, route = scope["method"], _route_of(scope)
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(time.perf_counter() - started)


def build_router(settings: Settings) -> APIRouter:
    """`GET /metrics` in the Prometheus text format (behind the server's API keys, like every other route)."""
    router = APIRouter(tags=["monitoring"])

    @router.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router
