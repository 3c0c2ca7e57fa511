"""The one admission loop: every engine, in-process or hosted, is fed by `stream` over a transport.

The loop keeps a window of requests unfinished so that the scheduler always has a full queue: the
engine never drains at a chunk boundary, and memory stays bounded however long the input is. If
the consumer stops early (cancel, crash), the requests still in the engine are aborted. What
differs between an engine in this process and one in a host is only how a request reaches it and
how finished outputs come back: the transport.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from resources.engine_types import EngineDied, EngineFailure, EngineRequest


class EngineGone(Exception):
    """The engine behind a transport died (its core process, or the host); the message says why."""


class EngineTransport(Protocol):
    """How requests reach one engine and finished outputs come back."""

    def exchange(self, adds: list[tuple[str, EngineRequest]]) -> tuple[list[Any], list[tuple[str, EngineFailure]]]:
        """Admit `adds`, run the engine one step; the outputs finished since the last exchange (each
        `request_id` one of ours) and the admissions the engine refused. EngineGone if it died."""
        ...

    def window(self) -> int:
        """How many requests may be unfinished in the engine now (a host shares its window among clients)."""
        ...

    def abort(self, request_ids: list[str]) -> None:
        """Drop requests still in the engine (the consumer stopped)."""
        ...


def stream(transport: EngineTransport, requests: Iterable[EngineRequest],
           ids: Iterator[int], in_flight: int | None = None) -> Iterator[tuple[EngineRequest, Any]]:
    """Run `requests` and yield (request, output | EngineFailure) as each one finishes.

    `ids` numbers the requests (a counter kept by the engine for its lifetime, so two streams over
    one engine never reuse an id); `in_flight` overrides the transport's window (tests, benchmarks).
    EngineDied when the engine dies, with the requests it had not finished.
    """
    pending: dict[str, EngineRequest] = {}
    source = iter(requests)
    exhausted = dead = False
    try:
        while True:
            window = in_flight or transport.window()
            adds: list[tuple[str, EngineRequest]] = []
            for request in itertools.islice(source, max(window - len(pending), 0)) if not exhausted else ():
                request_id = f"r{request.key}-{next(ids)}"
                pending[request_id] = request
                adds.append((request_id, request))
            if not exhausted and len(pending) < window:
                exhausted = True  # islice stopped short: the source is empty
            if not pending:
                return
            try:
                outputs, failures = transport.exchange(adds)
            except EngineGone as exc:
                dead = True
                raise EngineDied(list(pending.values()), str(exc)) from exc
            for request_id, failure in failures:
                yield pending.pop(request_id), failure
            for output in outputs:
                if output.request_id in pending:  # not one aborted meanwhile
                    yield pending.pop(output.request_id), output
    finally:
        if pending and not dead:
            transport.abort(list(pending))


class Streaming:
    """An engine fed by the admission loop: `stream` over its transport, `dead` once it died."""

    dead: bool
    _transport: EngineTransport
    _ids: Iterator[int]

    def stream(self, requests: Iterable[EngineRequest], in_flight: int | None = None) -> Iterator[tuple[EngineRequest, Any]]:
        """Run `requests` and yield (request, output | EngineFailure) as each one finishes (see `stream`)."""
        try:
            yield from stream(self._transport, requests, self._ids, in_flight)
        except EngineDied:
            self.dead = True
            raise
