"""The Dagster instance: install dagster.yaml into DAGSTER_HOME and open it."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from dagster import DagsterInstance

from batch_pipeline.settings import Settings


class InstanceConfigError(Exception):
    """The instance files are missing or invalid."""


def instance_config(settings: Settings) -> dict:
    """dagster.yaml, plus the Postgres storage block when a Postgres URL is configured."""
    base = settings.home / "dagster.yaml"
    if not base.exists():
        raise InstanceConfigError(f"{base} not found: run vllm-batch from the project folder or set VBATCH_HOME")
    config = yaml.safe_load(base.read_text()) or {}
    if settings.postgres_url is not None:
        config.update(yaml.safe_load((settings.home / "dagster.postgres.yaml").read_text()))
    return config


def prepare_instance(settings: Settings) -> Path:
    """Write DAGSTER_HOME/dagster.yaml if it differs, export DAGSTER_HOME, and return it."""
    home = Path(os.environ.get("DAGSTER_HOME") or settings.resolved_dagster_home)
    home.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(instance_config(settings), sort_keys=False)
    target = home / "dagster.yaml"
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault("VBATCH_HOME", str(settings.home.resolve()))
    return home


def open_instance(settings: Settings) -> DagsterInstance:
    """The configured instance (SQLite by default, Postgres when configured)."""
    prepare_instance(settings)
    return DagsterInstance.get()
