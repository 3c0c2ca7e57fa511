"""The one place where configuration is read from the environment.

Every setting has a default that works on a fresh clone (the embedded default: SQLite and files under
the project folder). Each can be set as an environment variable named `VBATCH_<NAME>`, e.g.
`VBATCH_CHUNK_SIZE=500`. Secrets (the Postgres URL, API keys) are only ever read here and never
written to logs or asset metadata.

The old prefix `VLLM_BATCH_` still works, with one deprecation line per variable: vLLM warns about
every `VLLM_*` variable it does not know, so the old names are moved to the new ones (and out of the
environment that the engine's processes inherit) before anything reads them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "VBATCH_"
LEGACY_ENV_PREFIX = "VLLM_BATCH_"

log = logging.getLogger(__name__)


def adopt_legacy_environment(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Move every `VLLM_BATCH_X` to `VBATCH_X` (an explicit `VBATCH_X` wins); returns the old names moved."""
    environ = os.environ if environ is None else environ
    moved = []
    for name in sorted(k for k in environ if k.startswith(LEGACY_ENV_PREFIX)):
        new_name = ENV_PREFIX + name[len(LEGACY_ENV_PREFIX):]
        value = environ.pop(name)
        environ.setdefault(new_name, value)
        log.warning("%s is deprecated: set %s instead", name, new_name)
        moved.append(name)
    return moved


class Settings(BaseSettings):
    """Deployment settings; see docs/ARCHITECTURE.md for what each one controls."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    home: Path = Field(default_factory=Path.cwd, description="Project folder; data/ and .dagster/ live here.")
    # A local folder, or an object-store URI (s3://bucket/prefix, gs://bucket/prefix; the objectstore extra)
    # that hosts share. With a URI, the host-local state (engine host, metrics, inbox, API uploads) stays
    # under HOME/data.
    data_dir: Path | str | None = Field(default=None, description="Where batch files live (default: HOME/data).")
    dagster_home: Path | None = Field(default=None, description="DAGSTER_HOME (default: HOME/.dagster).")
    postgres_url: SecretStr | None = Field(default=None, description="Use dagster-postgres when set.")

    models_file: Path | None = Field(default=None, description="YAML of served models (default HOME/models.yaml).")
    allow_local_model_paths: bool = Field(
        default=True, description="`vllm-batch submit` and the inbox may name a local model folder.")
    api_allow_local_model_paths: bool = Field(
        default=False, description="Batch API requests may name a local model folder (off: served models only).")

    # The Batch API server (`vllm-batch serve`).
    api_keys: SecretStr | None = Field(default=None, description="Bearer keys the API accepts, comma-separated.")
    api_keys_file: Path | None = Field(default=None, description="A file of API keys, one per line.")
    admin_api_keys: SecretStr | None = Field(
        default=None, description="Bearer keys that see every tenant's files and batches, comma-separated.")
    admin_api_keys_file: Path | None = Field(default=None, description="A file of admin API keys, one per line.")
    api_host: str = Field(default="127.0.0.1", description="Address `vllm-batch serve` binds.")
    log_format: Literal["text", "json"] = Field(
        default="text", description="`json`: every log line of runs, daemon, webserver and API as one JSON object.")
    api_port: int = Field(default=8000, ge=1, le=65535)
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1, description="Largest file POST /v1/files takes.")

    chunk_size: int = Field(default=256, ge=1, le=1_000_000)
    max_line_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)

    # Engine settings: the defaults suit a GPU; the CPU test setup overrides dtype and memory.
    model: str | None = Field(default=None, description="Default model when a batch names none.")
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = Field(default=0.90, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    # Several GPUs: one engine per `tensor_parallel_size` GPUs (an engine slot); the `gpu` pool admits one
    # batch step per slot. None: every visible GPU (on the CPU build: one CPU "device").
    gpus: int | None = Field(default=None, ge=1, description="GPUs to use (default: all visible).")
    engines_per_batch: int | None = Field(
        default=None, ge=1, description="Engines one batch may run on at once (data parallel; default: every free one).")
    max_num_seqs: int | None = None
    # None: the platform's default (eager on the CPU build, CUDA graphs + torch.compile on a GPU).
    enforce_eager: bool | None = None
    seed: int = 0
    engine_args: str = Field(default="{}", description="Extra vLLM engine arguments as a JSON object.")
    compact_json: bool = Field(default=True, description="JSON response formats without free whitespace.")
    # The response cache (docs/ARCHITECTURE.md, "The response cache"): deterministic requests (temperature 0
    # or a seed) answered before on the same model and engine settings are answered from DATA_DIR/response-cache.
    response_cache: bool = Field(default=False, description="Answer repeated deterministic requests from the cache.")
    response_cache_max_bytes: int = Field(
        default=1 << 30, ge=0, description="The cache's size bound; the oldest segments are evicted first.")
    keep_engine_loaded: bool = Field(default=False, description="Keep the engine between runs in one process.")
    # The warm engine (docs/ARCHITECTURE.md, "The warm engine host"). Unset: on for every run of the
    # instance (`vllm-batch start`, `serve`, the daemon's queue, inbox, schedules, the UI), off for
    # `vllm-batch run` (one batch, one process: its engine dies with the command). true: on for both;
    # false: off everywhere (each run loads its own engine).
    engine_host: bool | None = Field(default=None, description="Keep the engine warm in a host process between runs.")
    engine_idle_seconds: int = Field(default=600, ge=1, description="An idle engine host releases the GPU after this.")
    # Set by `vllm-batch start` for everything it launches: a warm engine host ends when that process is gone.
    service_pid: int | None = Field(default=None, description="(set by vllm-batch start) the service's process id.")
    # With the host on, batches of one model share its engine at once: the `gpu` pool admits this many
    # batch steps per engine slot (the slot's lock keeps one engine per GPU), and each attached batch
    # keeps an equal share of the engine's window in flight, at least 16 requests: 32 batches of 16
    # fill the 512-request window of an engine with 256 sequences (vLLM's GPU default).
    engine_host_clients: int = Field(default=32, ge=1, description="Batches of one model sharing a warm host at once.")

    # Operating with the daemon (docs/OPERATIONS.md): the inbox sensor and the catch-up schedule.
    inbox_dir: Path | None = Field(default=None, description="Folder the inbox sensor watches (default DATA_DIR/inbox).")
    inbox_interval_seconds: int = Field(default=10, ge=1, description="How often the inbox sensor looks.")
    inbox_enabled: bool = Field(default=True, description="Whether the inbox sensor starts switched on.")
    schedule_cron: str = Field(default="0 * * * *", description="Cron of the schedule that runs unmaterialised batches.")
    schedule_enabled: bool = Field(default=False, description="Whether that schedule starts switched on.")

    # Optional integrations (docs/INTEGRATIONS.md): each needs its pip extra and is off by default.
    enable_monitoring: bool = Field(default=False, description="Prometheus metrics (extra: monitoring).")
    enable_curation: bool = Field(default=False, description="Label Studio review tasks (extra: curation).")
    enable_webhooks: bool = Field(default=False, description="OpenAI-style batch webhooks (extra: webhooks).")
    result_handlers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Import paths of result handlers, comma-separated.")
    integrations: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Import paths of further integration modules, comma-separated.")

    # monitoring (integrations/monitoring): the scrape endpoint `vllm-batch start` serves when enabled.
    metrics_host: str = Field(default="127.0.0.1", description="Address of the metrics endpoint.")
    metrics_port: int = Field(default=9400, ge=1, le=65535, description="Port of the metrics endpoint.")
    metrics_dir: Path | None = Field(default=None, description="Run workers' vLLM metric files (default DATA_DIR/metrics).")
    metrics_poll_seconds: float = Field(default=5.0, gt=0, description="How often the exporter reads the instance.")
    # curation (integrations/curation): Label Studio review tasks and training data; read only when enabled.
    label_studio_url: str = Field(default="http://127.0.0.1:8080", description="Label Studio's base URL.")
    label_studio_api_key: SecretStr | None = Field(default=None, description="Label Studio API token (legacy token).")
    curation_project_per: str = Field(default="model", pattern="^(model|batch)$",
                                      description="One review project per model or per batch.")
    curation_sample_size: int | None = Field(default=None, ge=1, description="Review at most N requests per batch (seeded).")
    curation_sample_fraction: float | None = Field(default=None, gt=0, le=1, description="Review this fraction of a batch.")
    curation_sample_seed: int = Field(default=0, description="Seed of the sample; the same seed picks the same requests.")
    curation_only_schema_failures: bool = Field(default=False, description="Review only outputs failing their JSON schema.")
    curation_custom_ids: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Review only these custom_ids, comma-separated.")
    curation_page_size: int = Field(default=500, ge=1, le=10_000, description="Tasks per Label Studio import request.")
    curation_sensor_interval_seconds: int = Field(default=300, ge=10, description="How often new annotations are looked for.")

    # result handlers / webhooks (integrations/result_handlers, integrations/webhooks; credentials from the usual
    # AWS / Google chains). Several webhook endpoints: comma-separated URLs, one secret for all or one per URL.
    s3_bucket: str | None = Field(default=None, description="Bucket the S3 result handler writes to.")
    s3_prefix: str = Field(default="", description="Key prefix: objects go under PREFIX/BATCH_ID/.")
    s3_endpoint_url: str | None = Field(default=None, description="An S3-compatible endpoint (default: AWS).")
    s3_region: str | None = Field(default=None, description="Region (default: the AWS chain's).")
    gcs_bucket: str | None = Field(default=None, description="Bucket the GCS result handler writes to.")
    gcs_prefix: str = Field(default="", description="Object prefix: objects go under PREFIX/BATCH_ID/.")
    gcs_project: str | None = Field(default=None, description="Google Cloud project (default: from credentials).")
    gcs_endpoint_url: str | None = Field(default=None, description="A GCS emulator's URL (anonymous credentials).")
    webhook_url: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Webhook endpoints, comma-separated.")
    webhook_secret: SecretStr | None = Field(
        default=None, description="whsec_... signing secret(s): one for every endpoint, or one per URL.")
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, description="One delivery attempt's limit.")
    webhook_retry_seconds: float = Field(default=24 * 3600, ge=0, description="How long failed deliveries are retried.")
    webhook_backoff_seconds: float = Field(default=5.0, gt=0, description="First retry delay; doubles each attempt.")
    webhook_interval_seconds: int = Field(default=10, ge=1, description="How often the webhook sensor looks.")

    @field_validator("result_handlers", "integrations", "curation_custom_ids", "webhook_url", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("data_dir", mode="before")
    @classmethod
    def _local_path_or_uri(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if "://" not in value:
                return Path(value)
            if not value.startswith(("s3://", "gs://", "gcs://")):
                raise ValueError(f"VBATCH_DATA_DIR {value!r}: use a local folder, s3://bucket/prefix or gs://bucket/prefix")
            return value.rstrip("/")
        return value

    @field_validator("engine_args")
    @classmethod
    def _engine_args_is_json_object(cls, value: str) -> str:
        import json

        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"VBATCH_ENGINE_ARGS is not valid JSON: {exc.msg}") from None
        if not isinstance(parsed, dict):
            raise ValueError("VBATCH_ENGINE_ARGS must be a JSON object")
        return value

    @property
    def warm_engine(self) -> bool:
        """Whether the instance's runs use the warm engine host (on unless VBATCH_ENGINE_HOST=false)."""
        return self.engine_host is not False

    @property
    def data_root(self) -> str:
        """Where batch files (spec, input, chunks, results) and queue tickets live: a folder or a URI."""
        if isinstance(self.data_dir, str):
            return self.data_dir
        return str(self.resolved_data_dir)

    @property
    def resolved_data_dir(self) -> Path:
        """The local data folder, absolute (HOME/data when the data root is an object-store URI)."""
        if isinstance(self.data_dir, Path):
            return self.data_dir.resolve()
        return (self.home / "data").resolve()

    @property
    def resolved_inbox_dir(self) -> Path:
        """The folder the inbox sensor watches, absolute."""
        return (self.inbox_dir or self.resolved_data_dir / "inbox").resolve()

    @property
    def resolved_dagster_home(self) -> Path:
        """The Dagster instance folder, absolute."""
        return (self.dagster_home or self.home / ".dagster").resolve()

    def api_key_set(self) -> frozenset[str]:
        """Every tenant's API key, from VBATCH_API_KEYS and the keys file (blank entries dropped)."""
        return _key_set(self.api_keys, self.api_keys_file)

    def admin_key_set(self) -> frozenset[str]:
        """Every admin API key, from VBATCH_ADMIN_API_KEYS and its keys file (blank entries dropped)."""
        return _key_set(self.admin_api_keys, self.admin_api_keys_file)


def _key_set(listed: SecretStr | None, keys_file: Path | None) -> frozenset[str]:
    keys = listed.get_secret_value().split(",") if listed else []
    if keys_file is not None:
        keys += keys_file.read_text().splitlines()
    return frozenset(key.strip() for key in keys if key.strip())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    adopt_legacy_environment()
    return Settings()
