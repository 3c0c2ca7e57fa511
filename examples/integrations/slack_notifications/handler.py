"""SlackHandler: posts a one-message summary of a finished batch to a Slack-compatible incoming-webhook URL.

The URL is a secret (its path is the token): it comes from VBATCH_SLACK_WEBHOOK_URL through Dagster's
EnvVar, so the UI shows the variable's name, never its value. A batch is announced once: what was posted
is remembered in the batch's folder (handlers/slack.json), and a re-run with the same counts posts nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from dagster import EnvVar

from batch_pipeline.domain.settings import Settings
from integrations.result_handlers.base import Delivered, DeliveryRefused, FinishedBatch, ResultHandler


def summary_message(batch: FinishedBatch) -> dict[str, Any]:
    """The Slack message: plain `text` (what every Slack-compatible receiver shows) plus a block."""
    counts = batch.counts
    text = (f"Batch {batch.batch_id} finished on {batch.model}: {counts.get('completed', 0)} of "
            f"{counts.get('total', 0)} requests completed, {counts.get('failed', 0)} failed, "
            f"{counts.get('completion_tokens', 0)} tokens generated.")
    if batch.metadata:
        text += " Metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(batch.metadata.items()))
    return {"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]}


class SlackHandler(ResultHandler):
    """Announces each finished batch in a Slack channel."""

    handler_name = "slack"
    requires = ("httpx",)

    webhook_url: str
    timeout_seconds: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> SlackHandler:
        return cls(webhook_url=EnvVar("VBATCH_SLACK_WEBHOOK_URL"))

    def deliver(self, batch: FinishedBatch, log: Any) -> list[Delivered]:
        import httpx

        message = json.dumps(summary_message(batch), sort_keys=True)
        checksum = hashlib.sha256(message.encode()).hexdigest()
        marker = batch.files["summary.json"].parent.parent / "handlers" / "slack.json"
        posted = json.loads(marker.read_text()).get("sha256") if marker.is_file() else None
        uri = "slack:incoming-webhook"  # never the URL itself: it is the secret
        if posted == checksum:
            log.info(f"batch {batch.batch_id} was already announced")
            return [Delivered("message", uri, len(message), checksum, transferred=False)]
        response = httpx.post(self.webhook_url, content=message, headers={"content-type": "application/json"},
                              timeout=self.timeout_seconds)
        if 400 <= response.status_code < 500 and response.status_code != 429:
            raise DeliveryRefused(f"Slack answered {response.status_code}: {response.text[:200]}")
        response.raise_for_status()  # 5xx and 429: the asset's retry policy tries again
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"sha256": checksum}))
        return [Delivered("message", uri, len(message), checksum, transferred=True)]
