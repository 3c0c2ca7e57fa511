"""The integration seam: which optional integrations are switched on, and their Dagster definitions.

An integration is a module exposing `build_definitions(settings) -> dagster.Definitions` (its assets,
sensors, resources) and, if it runs something beside the daemon (the metrics endpoint),
`start_service(settings, echo)` returning an object with `stop()`, which `vllm-batch start` calls.
The built-in ones live in `integrations/<name>/definitions.py`, each switched on by its flag
(`VBATCH_ENABLE_<NAME>=true`) and needing its pip extra; further ones (your own, or the example
under examples/) are named by import path in `VBATCH_INTEGRATIONS`.

Integration assets sit downstream of `batch_results` on the `batches` partitions and carry an
automation condition, so they run after a batch's results exist without being part of `batch_job`:
a failing integration never fails the batch, shows in the UI, and is retried on its own.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from batch_pipeline.domain.settings import Settings

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
    # "module:attribute" of a click command group it adds to `vllm-batch` (its name is the group's name).
    cli: str | None = None
    # "module:function(settings) -> fastapi.APIRouter" of routes it adds to the Batch API server (`vllm-batch
    # serve`) when it is enabled; they sit behind the server's API keys.
    api: str | None = None
    # "module:Class" of a pure ASGI middleware, `Class(app, settings=settings)`, that the server wraps around
    # everything (outside the API-key check) when the integration is enabled, e.g. to measure requests.
    api_middleware: str | None = None

    def check_installed(self, settings: Settings | None = None) -> None:
        """Raise IntegrationError naming the extra when a package it needs is not importable."""
        missing = [name for name in self.requires if not _importable(name)]
        if missing:
            raise IntegrationError(
                f"the {self.name} integration is enabled but needs the '{self.extra}' extra "
                f"(missing {', '.join(missing)}): pip install 'vllm-batch-pipeline[{self.extra}]'")
        if self.check is not None and settings is not None:
            load_attribute(self.check)(settings)

    def import_module(self, settings: Settings | None = None) -> ModuleType:
        """The integration's module, or IntegrationError."""
        self.check_installed(settings)
        try:
            return importlib.import_module(self.module)
        except ImportError as exc:
            raise IntegrationError(f"the {self.name} integration cannot be imported ({self.module}): {exc}") from None

    def load(self, settings: Settings) -> Definitions:
        """Import the module and build its definitions."""
        module = self.import_module(settings)
        build = getattr(module, "build_definitions", None)
        if build is None:
            raise IntegrationError(f"integration module {self.module} has no build_definitions(settings)")
        return build(settings)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a dotted name whose parent package is missing
        return False


# The built-in integrations, in the order their definitions are merged.
BUILT_IN: dict[str, Integration] = {
    "monitoring": Integration("monitoring", "integrations.monitoring.definitions", "monitoring",
                              ("prometheus_client",), api="integrations.monitoring.api_metrics:build_router",
                              api_middleware="integrations.monitoring.api_metrics:RequestMetrics"),
    "curation": Integration("curation", "integrations.curation.definitions", "curation", ("label_studio_sdk",),
                            cli="integrations.curation.cli:curation", api="integrations.curation.api:build_router"),
    "webhooks": Integration("webhooks", "integrations.webhooks.definitions", "webhooks", ("standardwebhooks", "httpx"),
                            check="integrations.webhooks.sensors:check_webhook_settings",
                            cli="integrations.webhooks.cli:webhooks"),
    "result_handlers": Integration("result_handlers", "integrations.result_handlers.definitions",
                                   check="integrations.result_handlers.registry:check_handlers"),
}


def load_attribute(reference: str) -> Any:
    """`package.module:attribute`, imported."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def integration_commands() -> dict[str, str]:
    """The `vllm-batch` command groups integrations add: name -> "module:attribute" (imported on use)."""
    return {integration.name: integration.cli for integration in BUILT_IN.values() if integration.cli}


def integration_routers(settings: Settings) -> list[Any]:
    """The API routers (`fastapi.APIRouter`) of the enabled integrations that add routes to `vllm-batch serve`."""
    routers = []
    for integration in enabled_integrations(settings):
        if integration.api is not None:
            integration.check_installed(settings)
            routers.append(load_attribute(integration.api)(settings))
    return routers


def integration_middleware(settings: Settings) -> list[Any]:
    """The ASGI middleware classes of the enabled integrations, for `vllm-batch serve`."""
    classes = []
    for integration in enabled_integrations(settings):
        if integration.api_middleware is not None:
            integration.check_installed(settings)
            classes.append(load_attribute(integration.api_middleware))
    return classes


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


# Integrations that read a batch's files from the local disk (not yet from an object-store data root).
_LOCAL_DATA_ONLY = ("curation", "result_handlers")


def check_integrations(settings: Settings) -> None:
    """Fail fast, with one line, when an enabled integration's extra is missing (or it needs a local data folder)."""
    for integration in enabled_integrations(settings):
        integration.check_installed(settings)
        if integration.name in _LOCAL_DATA_ONLY and isinstance(settings.data_dir, str):
            raise IntegrationError(f"the {integration.name} integration reads batch files from a local folder: "
                                   f"it does not work with VBATCH_DATA_DIR={settings.data_dir} yet")


def start_integration_services(settings: Settings, echo: Callable[[str], object]) -> list[Callable[[], object]]:
    """Start what enabled integrations run beside the daemon (`start_service(settings, echo)` in their module,
    e.g. the metrics endpoint); returns the functions that stop them."""
    stops = []
    for integration in enabled_integrations(settings):
        start = getattr(integration.import_module(settings), "start_service", None)
        handle = start(settings, echo) if start is not None else None
        if handle is not None:
            stops.append(handle.stop)
    return stops


def input_path(settings: Settings, value: str) -> Path:
    """A batch input as given on the command line: a local path, or an s3:// or gs:// URI, which the
    object-storage part of the result_handlers integration streams into DATA_DIR/inputs/ (needs the
    `s3` or `gcs` extra)."""
    if not value.startswith(OBJECT_URI_SCHEMES):
        return Path(value)
    module = importlib.import_module("integrations.result_handlers.object_inputs")
    try:
        return module.fetch_object(settings, value)
    except module.ObjectInputError as exc:
        raise IntegrationError(str(exc)) from None


OBJECT_URI_SCHEMES = ("s3://", "gs://")


def integration_definitions(settings: Settings) -> list[Definitions]:
    """The Definitions of every enabled integration."""
    return [integration.load(settings) for integration in enabled_integrations(settings)]
