"""The integration seam: which optional integrations are switched on, and their Dagster definitions.

An integration is a module exposing `build_definitions(settings) -> dagster.Definitions` (its assets,
sensors, resources). The built-in ones live in `integrations/<name>/definitions.py`, each switched on
by its flag (`VBATCH_ENABLE_<NAME>=true`) and needing its pip extra; further ones (your own, or the
example under examples/) are named by import path in `VBATCH_INTEGRATIONS`.

Integration assets sit downstream of `batch_results` on the `batches` partitions and carry an
automation condition, so they run after a batch's results exist without being part of `batch_job`:
a failing integration never fails the batch, shows in the UI, and is retried on its own.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batch_pipeline.settings import Settings

if TYPE_CHECKING:
    from dagster import Definitions


class IntegrationError(Exception):
    """An enabled integration cannot be loaded; one readable line (which extra to install)."""


@dataclass(frozen=True)
class Integration:
    """An integration: its name, the module with `build_definitions`, and the extra that brings its packages."""

    name: str
    module: str
    extra: str | None = None
    requires: tuple[str, ...] = ()
    # "module:function(settings)" that checks what the settings switch on inside the integration (e.g. which
    # result handlers, each with its own extra); importable without any extra, raises IntegrationError.
    check: str | None = None

    def check_installed(self, settings: Settings | None = None) -> None:
        """Raise IntegrationError naming the extra when a package it needs is not importable."""
        missing = [name for name in self.requires if importlib.util.find_spec(name) is None]
        if missing:
            raise IntegrationError(
                f"the {self.name} integration is enabled but needs the '{self.extra}' extra "
                f"(missing {', '.join(missing)}): pip install 'vllm-batch-pipeline[{self.extra}]'")
        if self.check is not None and settings is not None:
            module, _, function = self.check.partition(":")
            getattr(importlib.import_module(module), function)(settings)

    def load(self, settings: Settings) -> Definitions:
        """Import the module and build its definitions."""
        self.check_installed(settings)
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise IntegrationError(f"the {self.name} integration cannot be imported ({self.module}): {exc}") from None
        build = getattr(module, "build_definitions", None)
        if build is None:
            raise IntegrationError(f"integration module {self.module} has no build_definitions(settings)")
        return build(settings)


# The built-in integrations, in the order their definitions are merged.
BUILT_IN: dict[str, Integration] = {
    "monitoring": Integration("monitoring", "integrations.monitoring.definitions", "monitoring",
                              ("prometheus_client",)),
    "curation": Integration("curation", "integrations.curation.definitions", "curation", ("label_studio_sdk",)),
    "webhooks": Integration("webhooks", "integrations.webhooks.definitions", "webhooks", ("standardwebhooks", "httpx"),
                            check="integrations.webhooks.sensors:check_webhook_settings"),
    "result_handlers": Integration("result_handlers", "integrations.result_handlers.definitions",
                                   check="integrations.result_handlers.registry:check_handlers"),
}


def enabled_integrations(settings: Settings) -> list[Integration]:
    """The integrations the settings switch on: built-in flags first, then VBATCH_INTEGRATIONS in order."""
    flags = {"monitoring": settings.enable_monitoring, "curation": settings.enable_curation,
             "webhooks": settings.enable_webhooks, "result_handlers": bool(settings.result_handlers)}
    chosen = [BUILT_IN[name] for name, on in flags.items() if on]
    chosen += [Integration(_name_of(path), path) for path in settings.integrations]
    return chosen


def _name_of(module_path: str) -> str:
    # `examples.integrations.batch_digest.definitions` is the batch_digest integration.
    parts = module_path.split(".")
    return parts[-2] if parts[-1] == "definitions" and len(parts) > 1 else parts[-1]


def check_integrations(settings: Settings) -> None:
    """Fail fast, with one line, when an enabled integration's extra is missing."""
    for integration in enabled_integrations(settings):
        integration.check_installed(settings)


def integration_definitions(settings: Settings) -> list[Definitions]:
    """The Definitions of every enabled integration."""
    return [integration.load(settings) for integration in enabled_integrations(settings)]
