"""Webhooks identical to OpenAI's batch webhooks: batch.completed/failed/cancelled/expired, Standard Webhooks signed."""
