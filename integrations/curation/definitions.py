"""The curation integration's definitions: its assets, the new-annotations sensor and the Label Studio resource."""

from __future__ import annotations

import os

from dagster import Definitions, EnvVar

from batch_pipeline.domain.settings import ENV_PREFIX, Settings
from integrations.curation.assets import build_assets
from integrations.curation.resources import LabelStudio
from integrations.curation.sensors import build_annotations_sensor

API_KEY_ENV = f"{ENV_PREFIX}LABEL_STUDIO_API_KEY"


def label_studio_resource(settings: Settings) -> LabelStudio:
    """The resource from the settings; the token is passed as an EnvVar where it came from the environment,
    so the Dagster UI shows the variable's name instead of the token."""
    secret = settings.label_studio_api_key.get_secret_value() if settings.label_studio_api_key else ""
    api_key = EnvVar(API_KEY_ENV) if secret and os.environ.get(API_KEY_ENV) == secret else secret
    return LabelStudio(url=settings.label_studio_url, api_key=api_key, page_size=settings.curation_page_size)


def build_definitions(settings: Settings) -> Definitions:
    """Curation assets on the `batches` partitions, the sensor, and the `label_studio` resource."""
    return Definitions(
        assets=build_assets(settings),
        sensors=[build_annotations_sensor(settings.curation_sensor_interval_seconds)],
        resources={"label_studio": label_studio_resource(settings)},
    )
