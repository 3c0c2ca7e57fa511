"""The webhook tests' settings; the receiver they send to is tests/support/webhook_receiver.py."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from tests.support.webhook_receiver import SECRET, Receiver


@pytest.fixture
def webhook_settings(settings, receiver: Receiver):
    """Settings with webhooks on, sending to /a and /b of the receiver, quick retries."""
    return settings.model_copy(update={
        "enable_webhooks": True, "webhook_url": [f"{receiver.url}/a", f"{receiver.url}/b"],
        "webhook_secret": SecretStr(SECRET), "webhook_backoff_seconds": 0.05,
        "webhook_timeout_seconds": 10.0, "webhook_retry_seconds": 30.0})
