"""A real batch on the real engine (CPU build, tiny model): it lands in SeaweedFS and in the GCS emulator,
a re-run uploads nothing, and its webhook is sent."""

from __future__ import annotations

import hashlib

from pydantic import SecretStr

from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process
from tests.integrations.result_handlers.conftest import delivered, gcs_client
from tests.support.files import write_jsonl
from tests.support.webhook_receiver import SECRET

MODEL_NAME = "tiny-llama"


def test_a_real_batch_lands_in_s3_and_gcs_and_announces_itself(settings, sqlite_instance, tiny_model, loaded_engine,
                                                               s3_env, gcs_server, receiver,
                                                               materialize_handler):
    import boto3
    from openai.types.webhooks import BatchCompletedWebhookEvent

    from integrations.webhooks.sensors import webhook_tick

    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket="e2e-results")
    gcs = gcs_client(gcs_server)
    gcs.create_bucket("e2e-results-gcs")
    settings = settings.model_copy(update={
        "result_handlers": ["s3", "gcs"], "s3_bucket": "e2e-results", "s3_prefix": "batches", "s3_endpoint_url": s3_env,
        "gcs_bucket": "e2e-results-gcs", "gcs_prefix": "batches", "gcs_endpoint_url": gcs_server,
        "enable_webhooks": True, "webhook_url": [f"{receiver.url}/hook"], "webhook_secret": SecretStr(SECRET)})
    lines = [{"custom_id": f"c-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"item {i}"}], "max_tokens": 8,
                       "temperature": 0}} for i in range(20)]
    path = write_jsonl(settings.resolved_data_dir.parent / "e2e.jsonl", lines)
    spec = register_local_batch(settings, sqlite_instance, path, str(tiny_model), MODEL_NAME, batch_id="e2e-1")

    run = run_batch_in_process(settings, sqlite_instance, spec.batch_id)
    assert run.success, run.error
    assert run.integration_error is None

    local = hashlib.sha256(run.paths.output.read_bytes()).hexdigest()
    remote = client.get_object(Bucket="e2e-results", Key="batches/e2e-1/output.jsonl")
    assert hashlib.sha256(remote["Body"].read()).hexdigest() == local == remote["Metadata"]["sha256"]
    from dagster import AssetKey

    event = sqlite_instance.get_latest_materialization_event(AssetKey("deliver_s3"))
    assert event.dagster_event.partition == "e2e-1"
    assert event.asset_materialization.metadata["output.jsonl sha256"].value == local
    blob = gcs.bucket("e2e-results-gcs").blob("batches/e2e-1/output.jsonl")
    assert hashlib.sha256(blob.download_as_bytes()).hexdigest() == local
    event = sqlite_instance.get_latest_materialization_event(AssetKey("deliver_gcs"))
    assert event.dagster_event.partition == "e2e-1"
    assert event.asset_materialization.metadata["output.jsonl sha256"].value == local

    # Delivering the same batch again moves no bytes, to either store.
    again = materialize_handler(settings, sqlite_instance, "e2e-1")
    assert again.success
    for asset in ("deliver_s3", "deliver_gcs"):
        assert delivered(again, asset)["transferred_files"] == 0 and delivered(again, asset)["transferred_bytes"] == 0

    webhook_tick(sqlite_instance, settings, None)
    [delivery] = receiver.at("hook")
    assert isinstance(delivery.event, BatchCompletedWebhookEvent) and delivery.event.data.id == "e2e-1"
