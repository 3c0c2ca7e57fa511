"""The result handlers' fixtures and helpers; the object stores (SeaweedFS, fake-gcs-server) are in
tests/support/object_stores.py."""

from __future__ import annotations

import pytest


@pytest.fixture
def materialize_handler():
    """Materialise the result_handlers integration's assets for one batch, as the automation sensor would."""
    return _materialize_handler


def _materialize_handler(settings, instance, batch_id: str, **overrides):
    from dagster import materialize

    from batch_pipeline.orchestration.definitions import build_resources
    from integrations.result_handlers.definitions import build_definitions

    settings = settings.model_copy(update=overrides)
    defs = build_definitions(settings)
    resources = {**build_resources(settings), **defs.resources}
    resources.pop("engine")
    return materialize(list(defs.assets), partition_key=batch_id, instance=instance, resources=resources,
                       raise_on_error=False)


def delivered(result, asset: str = "deliver_s3") -> dict:
    """The metadata of the materialisation of `asset` in a `materialize` result."""
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return {key: value.value for key, value in event.materialization.metadata.items()}


def gcs_client(endpoint: str):
    """A google-cloud-storage client for the fake-gcs-server at `endpoint`."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
