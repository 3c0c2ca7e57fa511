"""The result_handlers integration: a `deliver_<name>` asset and its resource for each enabled handler."""

from __future__ import annotations

from dagster import Definitions

from batch_pipeline.domain.settings import Settings
from integrations.result_handlers.assets import build_handler_asset, resource_key
from integrations.result_handlers.registry import configured_handler, enabled_handlers


def build_definitions(settings: Settings) -> Definitions:
    """One asset per handler named in VBATCH_RESULT_HANDLERS, each with its handler as a resource."""
    handlers = enabled_handlers(settings)
    return Definitions(assets=[build_handler_asset(handler) for handler in handlers],
                       resources={resource_key(handler): configured_handler(handler, settings) for handler in handlers})
