"""Which result handlers are enabled: VBATCH_RESULT_HANDLERS names them by import path or registered name.

A name is either an import path (`integrations.result_handlers.s3_handler.S3Handler`, or `module:Class`) or
the name of an entry point in the `vllm_batch.result_handlers` group, which is how other packages register
theirs (`[project.entry-points."vllm_batch.result_handlers"] slack = "my_pkg.slack:SlackHandler"`). The
built-in handlers answer to `s3` and `gcs` too. This module imports no handler's packages (boto3, ...).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util

from batch_pipeline.domain.settings import Settings
from batch_pipeline.orchestration.enabled_integrations import IntegrationError
from integrations.result_handlers.base import ResultHandler

ENTRY_POINT_GROUP = "vllm_batch.result_handlers"
BUILT_IN = {
    "s3": "integrations.result_handlers.s3_handler:S3Handler",
    "gcs": "integrations.result_handlers.gcs_handler:GCSHandler",
}


def _import(path: str) -> object:
    module, sep, attribute = path.partition(":")
    if not sep:
        module, _, attribute = path.rpartition(".")
    if not module or not attribute:
        raise IntegrationError(f"result handler {path!r} is not an import path (package.module.Class)")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise IntegrationError(f"result handler {path!r} cannot be imported: {exc}") from None


def handler_class(name: str) -> type[ResultHandler]:
    """The ResultHandler subclass a name stands for."""
    if name in BUILT_IN:
        target = _import(BUILT_IN[name])
    elif "." in name or ":" in name:
        target = _import(name)
    else:
        points = [point for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if point.name == name]
        if not points:
            raise IntegrationError(f"no result handler named {name!r}: give an import path, or install the package "
                                   f"that registers it in the '{ENTRY_POINT_GROUP}' entry-point group")
        try:
            target = points[0].load()
        except (ImportError, AttributeError) as exc:
            raise IntegrationError(f"result handler {name!r} ({points[0].value}) cannot be imported: {exc}") from None
    if not (isinstance(target, type) and issubclass(target, ResultHandler)):
        raise IntegrationError(f"result handler {name!r} is not a ResultHandler subclass")
    return target


def _importable(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # a parent package (google.cloud) is missing
        return False


def check_handler_installed(cls: type[ResultHandler]) -> None:
    """One line naming the extra when a package the handler needs is not importable."""
    missing = [package for package in cls.requires if not _importable(package)]
    if missing:
        install = f"pip install 'vllm-batch-pipeline[{cls.extra}]'" if cls.extra else f"pip install {' '.join(missing)}"
        raise IntegrationError(f"the {cls.short_name()} result handler needs the '{cls.extra or missing[0]}' extra "
                               f"(missing {', '.join(missing)}): {install}")


def enabled_handlers(settings: Settings) -> list[type[ResultHandler]]:
    """The handler classes VBATCH_RESULT_HANDLERS names, checked; two with one short name are refused."""
    classes = [handler_class(name) for name in settings.result_handlers]
    names = [cls.short_name() for cls in classes]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise IntegrationError(f"two result handlers share the name {duplicates[0]!r}: set handler_name on one")
    for cls in classes:
        check_handler_installed(cls)
    return classes


def configured_handler(cls: type[ResultHandler], settings: Settings) -> ResultHandler:
    """The handler built from the settings; a missing or bad setting is one line."""
    try:
        return cls.from_settings(settings)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError too
        raise IntegrationError(f"the {cls.short_name()} result handler is not configured: {exc}") from None


def check_handlers(settings: Settings) -> None:
    """The result_handlers integration's check (batch_pipeline.orchestration.enabled_integrations calls it)."""
    for cls in enabled_handlers(settings):
        configured_handler(cls, settings)
