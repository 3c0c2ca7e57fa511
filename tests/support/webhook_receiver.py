"""A local webhook receiver that verifies every delivery with the official openai client, as a user's would.

A pytest plugin (tests/conftest.py loads it): the `receiver` fixture, for the webhook and result-handler tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_plJ3nmyCDGBKInavdOK15jsl0000000000000000000"


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    event: object = None  # what openai's webhooks.unwrap returned, when the signature verified
    error: str | None = None
    answered: bool = False  # the receiver has verified (or refused) it


@dataclass
class Receiver:
    """Answers POSTs under /<name>: verifies with `openai.OpenAI(webhook_secret=...).webhooks.unwrap`."""

    url: str
    secret: str = SECRET
    deliveries: list[Delivery] = field(default_factory=list)
    fail_first: dict[str, int] = field(default_factory=dict)  # path -> answer 500 this many times
    hang: dict[str, float] = field(default_factory=dict)  # path -> seconds to sleep before answering
    hold: dict[str, threading.Event] = field(default_factory=dict)  # path -> answer only once this is set

    def at(self, name: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.path == f"/{name}"]

    def answered(self, name: str) -> list[Delivery]:
        return [d for d in self.at(name) if d.answered]

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> int:
        import openai

        delivery = Delivery(path, headers, body, time.monotonic())
        self.deliveries.append(delivery)
        time.sleep(self.hang.get(path, 0))
        if path in self.hold:
            self.hold[path].wait(120)
        try:
            if self.fail_first.get(path, 0) > 0:
                self.fail_first[path] -= 1
                return 500
            try:
                delivery.event = openai.OpenAI(api_key="unused", webhook_secret=self.secret).webhooks.unwrap(body, headers)
            except Exception as exc:  # noqa: BLE001 - a receiver answers 400 to anything it cannot verify
                delivery.error = f"{type(exc).__name__}: {exc}"
                return 400
            return 200
        finally:
            delivery.answered = True


@pytest.fixture(scope="session")
def receiver_server() -> Iterator[Receiver]:
    import openai  # noqa: F401 - imported once here, not inside the first delivery (it takes seconds)

    state: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            status = state["receiver"].handle(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            try:
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"ok" if status == 200 else b"no")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the sender gave up (timeout) or was killed

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state["receiver"] = Receiver(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state  # type: ignore[misc]
    server.shutdown()


@pytest.fixture
def receiver(receiver_server) -> Receiver:
    """A fresh receiver (the server is started once per session)."""
    receiver_server["receiver"] = Receiver(url=receiver_server["receiver"].url)
    return receiver_server["receiver"]
