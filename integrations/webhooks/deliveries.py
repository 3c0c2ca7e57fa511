"""Delivering webhook events: Standard Webhooks signatures, retries with backoff, a log on disk, dead letters.

Every event is written to DATA_DIR/webhooks/events/<event id>.json before its first attempt, with the exact
body and, per endpoint, the attempts made, when the next is due, and whether it was delivered or given up
(a dead letter). A restarted daemon reads the log and carries on with the same ids and bodies. Attempts run
in a thread pool with a timeout each, so a slow endpoint never holds up another.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batch_pipeline.domain.settings import Settings
from resources.storage import atomic_path

# 4xx answers that may succeed later; any other 4xx is final (the receiver refused the event).
RETRYABLE_4XX = {408, 409, 425, 429}
MAX_BACKOFF_SECONDS = 3600.0
MAX_PARALLEL = 8


@dataclass(frozen=True)
class Endpoint:
    """A receiver: its URL and signing secret (never logged; `label` is what logs and the UI show)."""

    url: str
    secret: str

    @property
    def key(self) -> str:
        return hashlib.sha256(self.url.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        # The path of a webhook URL often carries a token (Slack-style); show scheme and host only.
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}/…"


def endpoints_from(settings: Settings) -> list[Endpoint]:
    """The endpoints of VBATCH_WEBHOOK_URL with their secrets (one secret for all, or one per URL)."""
    secrets = [s.strip() for s in (settings.webhook_secret.get_secret_value() if settings.webhook_secret else "")
               .split(",") if s.strip()]
    if settings.webhook_url and not secrets:
        raise ValueError("VBATCH_WEBHOOK_SECRET is required with VBATCH_WEBHOOK_URL (a whsec_... secret)")
    if len(secrets) not in (1, len(settings.webhook_url)):
        raise ValueError("VBATCH_WEBHOOK_SECRET: give one secret for every endpoint, or one per VBATCH_WEBHOOK_URL")
    return [Endpoint(url, secrets[0] if len(secrets) == 1 else secrets[i]) for i, url in enumerate(settings.webhook_url)]


class DeliveryLog:
    """The events and their delivery states, one JSON file per event under DATA_DIR/webhooks/events/."""

    def __init__(self, data_dir: Path):
        self.root = Path(data_dir) / "webhooks"
        self.events_dir = self.root / "events"

    @contextmanager
    def locked(self) -> Iterator[DeliveryLog]:
        """Exclusive use of the log (the sensor, a resend from the CLI, a second daemon wait their turn)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def path(self, event_id: str) -> Path:
        return self.events_dir / f"{event_id}.json"

    def has(self, event_id: str) -> bool:
        return self.path(event_id).exists()

    def read(self, event_id: str) -> dict[str, Any]:
        return json.loads(self.path(event_id).read_text())

    def write(self, record: dict[str, Any]) -> None:
        """Write an event's record; a marker in pending/ lists it while any delivery is unfinished."""
        event_id = record["event"]["id"]
        marker = self.root / "pending" / event_id
        unfinished = any(s["delivered_at"] is None and s["dead_at"] is None for s in record["deliveries"].values())
        if unfinished:  # marker first: a crash in between leaves a marker too many, never one too few
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        with atomic_path(self.path(event_id)) as tmp:
            tmp.write_text(json.dumps(record, indent=1))
        if not unfinished:
            marker.unlink(missing_ok=True)

    def records(self, pending: bool = False) -> list[dict[str, Any]]:
        """Every event's record (or only those with an unfinished delivery), oldest first."""
        if pending:
            folder = self.root / "pending"
            paths = [self.path(p.name) for p in folder.glob("evt_*")] if folder.is_dir() else []
        else:
            paths = list(self.events_dir.glob("evt_*.json")) if self.events_dir.is_dir() else []
        return sorted((json.loads(p.read_text()) for p in paths if p.is_file()),
                      key=lambda r: (r["event"]["created_at"], r["event"]["id"]))

    def record(self, event: dict[str, Any], endpoints: list[Endpoint], now: float) -> dict[str, Any]:
        """Log a new event with a pending delivery per endpoint (the body is fixed here, once)."""
        body = json.dumps(event, separators=(",", ":"))
        record = {"event": event, "body": body, "recorded_at": now, "deliveries": {
            endpoint.key: {"endpoint": endpoint.label, "attempts": 0, "first_attempt_at": None, "next_attempt_at": now,
                           "delivered_at": None, "dead_at": None, "last_error": None, "last_status": None}
            for endpoint in endpoints}}
        self.write(record)
        return record

    def resend(self, event_id: str, now: float) -> dict[str, Any]:
        """Make the dead (or every) delivery of an event due again, same id and body, fresh retry window."""
        record = self.read(event_id)
        states = record["deliveries"].values()
        chosen = [s for s in states if s["dead_at"] is not None] or [s for s in states if s["delivered_at"] is None] \
            or list(states)
        for state in chosen:
            state.update(attempts=0, first_attempt_at=None, next_attempt_at=now, delivered_at=None, dead_at=None)
        self.write(record)
        return record


@dataclass(frozen=True)
class Attempt:
    """The outcome of one delivery attempt."""

    event_id: str
    endpoint: Endpoint
    ok: bool
    retryable: bool
    status: int | None
    error: str | None


def send(endpoint: Endpoint, event_id: str, body: str, timeout: float) -> Attempt:
    """POST the body, signed as Standard Webhooks says (what openai's `webhooks.unwrap` verifies)."""
    import httpx
    from standardwebhooks import Webhook

    now = datetime.now(timezone.utc)
    headers = {"webhook-id": event_id, "webhook-timestamp": str(int(now.timestamp())),
               "webhook-signature": Webhook(endpoint.secret).sign(event_id, now, body),
               "content-type": "application/json", "user-agent": "vllm-batch-webhooks/1"}
    try:
        response = httpx.post(endpoint.url, content=body.encode(), headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:  # network errors and timeouts: retried
        return Attempt(event_id, endpoint, False, True, None, f"{type(exc).__name__}: {exc}"[:300])
    if 200 <= response.status_code < 300:
        return Attempt(event_id, endpoint, True, False, response.status_code, None)
    retryable = response.status_code >= 500 or response.status_code in RETRYABLE_4XX
    return Attempt(event_id, endpoint, False, retryable, response.status_code,
                   f"HTTP {response.status_code}: {response.text[:200]}")


def next_delay(settings: Settings, attempts: int) -> float:
    """Exponential backoff: backoff, 2x, 4x, ... capped at an hour."""
    return min(settings.webhook_backoff_seconds * 2 ** (attempts - 1), MAX_BACKOFF_SECONDS)


def deliver_due(log: DeliveryLog, endpoints: list[Endpoint], settings: Settings, now: float | None = None,
                only: set[str] | None = None) -> list[tuple[dict[str, Any], Attempt, dict[str, Any]]]:
    """Attempt every due delivery once (in parallel), update the log; returns (event, attempt, new state)."""
    now = time.time() if now is None else now
    by_key = {endpoint.key: endpoint for endpoint in endpoints}
    due: list[tuple[dict[str, Any], Endpoint]] = []
    # Only events with an unfinished delivery are read: a tick costs the same after a year of batches.
    for record in log.records(pending=True):
        if only is not None and record["event"]["id"] not in only:
            continue
        for key, state in record["deliveries"].items():
            if (key in by_key and state["delivered_at"] is None and state["dead_at"] is None
                    and state["next_attempt_at"] <= now):
                due.append((record, by_key[key]))
    if not due:
        return []
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(due)), thread_name_prefix="webhook") as pool:
        attempts = list(pool.map(lambda item: send(item[1], item[0]["event"]["id"], item[0]["body"],
                                                   settings.webhook_timeout_seconds), due))
    done = time.time()
    results = []
    for (record, endpoint), attempt in zip(due, attempts, strict=True):
        record = log.read(record["event"]["id"])  # another endpoint's result may have been written meanwhile
        state = record["deliveries"][endpoint.key]
        state["attempts"] += 1
        state["first_attempt_at"] = state["first_attempt_at"] or now
        state["last_status"], state["last_error"] = attempt.status, attempt.error
        if attempt.ok:
            state["delivered_at"] = done
        elif not attempt.retryable or done + next_delay(settings, state["attempts"]) > \
                state["first_attempt_at"] + settings.webhook_retry_seconds:
            state["dead_at"] = done
        else:
            state["next_attempt_at"] = done + next_delay(settings, state["attempts"])
        log.write(record)
        results.append((record["event"], attempt, state))
    return results
