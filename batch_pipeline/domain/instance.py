"""The Dagster instance: install dagster.yaml into DAGSTER_HOME and open it."""

from __future__ import annotations

import fcntl
import os
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from dagster import DagsterInstance
from sqlalchemy.exc import DBAPIError

from batch_pipeline.domain.settings import Settings
from resources.device_slots import SlotConfigError, engine_slots


class InstanceConfigError(Exception):
    """The instance files are missing or invalid."""


# The project's own instance files, beside its packages in a checkout (an editable or source install).
_PROJECT = Path(__file__).resolve().parents[2]


def instance_file(settings: Settings, name: str) -> Path:
    """The project folder's `name` (dagster.yaml, dagster.postgres.yaml), or the project's own when the folder
    has none: `vllm-batch run` works in any folder, its data/ and .dagster/ then made there."""
    for folder in (settings.home, _PROJECT):
        if (folder / name).is_file():
            return folder / name
    raise InstanceConfigError(f"{settings.home / name} not found: run vllm-batch from the project folder or set "
                              "VBATCH_HOME")


def instance_config(settings: Settings) -> dict:
    """dagster.yaml, plus the Postgres storage block when a Postgres URL is configured."""
    config = yaml.safe_load(instance_file(settings, "dagster.yaml").read_text()) or {}
    # The `gpu` pool admits one batch step per engine slot (one slot per GPU, or per tensor-parallel
    # group); with the warm engine host, up to engine_host_clients batches of one model share a slot's host.
    try:
        slots = engine_slots(settings.gpus, settings.tensor_parallel_size)
    except SlotConfigError as exc:
        raise InstanceConfigError(str(exc)) from None
    per_slot = settings.engine_host_clients if settings.warm_engine else 1
    concurrency = config.setdefault("concurrency", {})
    gpu_steps = len(slots) * per_slot
    concurrency.setdefault("pools", {})["default_limit"] = gpu_steps
    # Every batch step that may share an engine needs a run of its own, plus room for the results and
    # integration runs of batches that finished meanwhile: a run limit below the pool's is a ceiling.
    runs = concurrency.setdefault("runs", {})
    runs["max_concurrent_runs"] = max(int(runs.get("max_concurrent_runs", 0)), gpu_steps + 4)
    if settings.postgres_url is not None:
        config.update(yaml.safe_load(instance_file(settings, "dagster.postgres.yaml").read_text()))
    return config


# One key for every process on every host that shares the database: pg_advisory_lock serialises the
# first creation (and any migration) of the Dagster tables, where a file lock cannot reach.
_POSTGRES_CREATION_LOCK = zlib.crc32(b"vllm-batch-pipeline: dagster instance creation")


@contextmanager
def _creation_lock(settings: Settings, home: Path) -> Iterator[None]:
    """Held while the instance is created or migrated: a file lock in DAGSTER_HOME, plus an advisory lock on PostgreSQL.

    Two processes creating the same storage at once leave it broken for good (two alembic heads), so
    whichever of `start`, `serve`, `run` and `submit` comes first creates it and the others wait.
    """
    with (home / "vllm-batch-instance.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if settings.postgres_url is None:
            yield
            return
        import psycopg2

        connection = psycopg2.connect(settings.postgres_url.get_secret_value())
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_lock(%s)", (_POSTGRES_CREATION_LOCK,))
            yield  # the lock ends with the session, however this process ends
        finally:
            connection.close()


def _write_atomically(target: Path, text: str) -> None:
    # A process starting beside this one must read the old file or the new one, never half of one.
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, target)


def _create_storage(instance: DagsterInstance) -> None:
    """Create every table the instance uses now, and migrate any that an older Dagster left behind."""
    # The SQLite event log creates its index database on first use, not when the instance opens.
    instance.get_dynamic_partitions("vllm-batch-instance-check")
    storages = (instance.run_storage, instance.event_log_storage, instance.schedule_storage)
    behind = [version for version in (storage.alembic_version() for storage in storages if storage is not None)
              if version is not None and version[0] is not None and version[0] != version[1]]
    if behind:
        instance.upgrade()


def prepare_instance(settings: Settings) -> Path:
    """Install dagster.yaml into DAGSTER_HOME, create (or migrate) its storage once, export DAGSTER_HOME; return it.

    Safe to call from any number of processes at once: creation happens under `_creation_lock`.
    """
    instance = _locked_open(settings)
    instance.dispose()
    return Path(os.environ["DAGSTER_HOME"])


def _locked_open(settings: Settings) -> DagsterInstance:
    home = Path(os.environ.get("DAGSTER_HOME") or settings.resolved_dagster_home)
    home.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(instance_config(settings), sort_keys=False)
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault("VBATCH_HOME", str(settings.home.resolve()))
    with _creation_lock(settings, home):
        target = home / "dagster.yaml"
        if not target.exists() or target.read_text() != text:
            _write_atomically(target, text)
        instance = DagsterInstance.get()
        try:
            _create_storage(instance)
        except BaseException:
            instance.dispose()
            raise
    return instance


def open_instance(settings: Settings) -> DagsterInstance:
    """The configured instance (SQLite by default, Postgres when configured), created once whoever comes first."""
    return _locked_open(settings)


def database_blip(exc: Exception) -> bool:
    """Whether a write to the instance's database failed because the database is restarting.

    dagster-postgres reports it as its own exception; it is checked only when the instance already
    loaded it (importing it here cost every run worker 2.7 s, and a SQLite instance never raises it).
    """
    postgres = sys.modules.get("dagster_postgres.utils")
    return isinstance(exc, DBAPIError) or (postgres is not None and isinstance(exc, postgres.DagsterPostgresException))
