"""`vllm-batch webhooks list|resend`: the delivery log and its dead letters, and sending an event again."""

from __future__ import annotations

import json
import time

import click


def _log_and_settings():
    from batch_pipeline.domain.settings import get_settings
    from integrations.webhooks.deliveries import DeliveryLog

    settings = get_settings()
    return DeliveryLog(settings.resolved_data_dir), settings


def _state_of(delivery: dict) -> str:
    return "delivered" if delivery["delivered_at"] else "dead" if delivery["dead_at"] else "pending"


@click.group()
def webhooks() -> None:
    """Batch webhooks: what was sent, what failed (dead letters), and resending."""


@webhooks.command("list")
@click.option("--dead", is_flag=True, help="Only events with a dead letter (a delivery given up).")
@click.option("--batch", "batch_id", help="Only this batch's events.")
@click.option("--json", "as_json", is_flag=True, help="Print the log records as JSON (bodies included).")
def list_events(dead: bool, batch_id: str | None, as_json: bool) -> None:
    """Every logged event and the state of its delivery to each endpoint."""
    log, _ = _log_and_settings()
    records = [r for r in log.records() if (batch_id is None or r["event"]["data"]["id"] == batch_id)
               and (not dead or any(d["dead_at"] for d in r["deliveries"].values()))]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    for record in records:
        event = record["event"]
        for delivery in record["deliveries"].values():
            error = f"  {delivery['last_error']}" if delivery["last_error"] and not delivery["delivered_at"] else ""
            click.echo(f"{event['id']}  {event['type']:<16} {event['data']['id']}  {delivery['endpoint']}  "
                       f"{_state_of(delivery)} after {delivery['attempts']} attempt(s){error}")


@webhooks.command()
@click.argument("event_ids", nargs=-1)
@click.option("--all-dead", is_flag=True, help="Every event with a dead letter.")
def resend(event_ids: tuple[str, ...], all_dead: bool) -> None:
    """Send events again now (same id and body, new signature); their dead deliveries get a new retry window."""
    from integrations.webhooks.deliveries import deliver_due, endpoints_from

    log, settings = _log_and_settings()
    with log.locked():
        ids = list(event_ids)
        if all_dead:
            ids += [r["event"]["id"] for r in log.records() if any(d["dead_at"] for d in r["deliveries"].values())]
        if not ids:
            raise click.UsageError("name an event id (see `vllm-batch webhooks list --dead`) or pass --all-dead")
        now = time.time()
        for event_id in ids:
            if not log.has(event_id):
                raise click.ClickException(f"no webhook event {event_id}")
            log.resend(event_id, now)
        failed = 0
        for event, attempt, state in deliver_due(log, endpoints_from(settings), settings, now=now, only=set(ids)):
            outcome = "delivered" if attempt.ok else f"{attempt.error} ({'dead letter' if state['dead_at'] else 'will retry'})"
            click.echo(f"{event['id']} -> {attempt.endpoint.label}: {outcome}")
            failed += not attempt.ok
    if failed:
        raise SystemExit(1)
