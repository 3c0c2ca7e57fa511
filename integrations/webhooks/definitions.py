"""The webhooks integration: the `batch_webhooks` sensor, built from the settings."""

from __future__ import annotations

from dagster import Definitions

from batch_pipeline.domain.settings import Settings
from integrations.webhooks.sensors import build_webhook_sensor


def build_definitions(settings: Settings) -> Definitions:
    """The sensor that sends the batch webhooks to VBATCH_WEBHOOK_URL's endpoints."""
    return Definitions(sensors=[build_webhook_sensor(settings)])
