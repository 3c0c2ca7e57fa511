"""The result handlers' fixtures; the object stores (SeaweedFS, fake-gcs-server) are in tests/object_stores.py."""

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
