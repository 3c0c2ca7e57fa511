"""Which models this deployment serves: served names mapped to a local directory or hub id, with engine args.

Configured in one YAML file (VBATCH_MODELS_FILE, default `models.yaml` in the project folder):

    models:
      llama-3.1-8b:
        path: /models/Meta-Llama-3.1-8B-Instruct     # or a hub id
        engine_args: {max_model_len: 8192}
      tiny-llama:
        path: models/tiny-llama

A batch may also name a local model directory directly: from `vllm-batch submit` and the inbox with
`allow_local_model_paths` (on by default, off by VBATCH_ALLOW_LOCAL_MODEL_PATHS=false), through the
Batch API only with `api_allow_local_model_paths` (off by default: an API key holder must not make the
server load whatever model folder lies on its disk). `vllm-batch run` takes any folder or hub id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from batch_pipeline.domain.settings import Settings


class ModelConfigError(Exception):
    """The models file is unreadable or invalid; one readable message."""


class UnknownModelError(Exception):
    """A batch named a model this deployment does not serve."""


class _ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    engine_args: dict[str, Any] = Field(default_factory=dict)


class _ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: dict[str, _ModelEntry] = Field(default_factory=dict)


@dataclass(frozen=True)
class ServedModel:
    """A model the deployment can run: what responses call it, what the engine loads, and how."""

    name: str
    model: str
    engine_args: dict[str, Any] = field(default_factory=dict)


class ModelRegistry:
    """The configured models, and the rule for local directories."""

    def __init__(self, models: dict[str, ServedModel], allow_local_paths: bool, base: Path):
        self.models = models
        self.allow_local_paths = allow_local_paths
        self.base = base

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRegistry:
        """Read the models file named by the settings (a missing default file means no configured models)."""
        path = settings.models_file or settings.home / "models.yaml"
        path = path if path.is_absolute() else settings.home / path
        entries: dict[str, ServedModel] = {}
        if path.exists():
            try:
                parsed = _ModelsFile.model_validate(yaml.safe_load(path.read_text()) or {})
            except (yaml.YAMLError, ValidationError) as exc:
                raise ModelConfigError(f"invalid models file {path}: {str(exc).splitlines()[0]}") from None
            for name, entry in parsed.models.items():
                local = (path.parent / entry.path).expanduser()
                model = str(local.resolve()) if local.exists() else entry.path
                entries[name] = ServedModel(name, model, entry.engine_args)
        elif settings.models_file is not None:
            raise ModelConfigError(f"models file not found: {path}")
        return cls(entries, settings.allow_local_model_paths, settings.home)

    def resolve(self, name: str, allow_hub_ids: bool = False, allow_local_paths: bool | None = None) -> ServedModel:
        """The served model for a name from a request or a batch, or UnknownModelError.

        `allow_hub_ids`: a name that is neither configured nor a local model folder is taken as a hub
        id (or a folder the engine will report missing), as `vllm-batch run --model` does.
        `allow_local_paths`: whether a local model folder may be named (default: the registry's rule).
        """
        if name in self.models:
            return self.models[name]
        local = Path(name).expanduser()
        allow_local_paths = self.allow_local_paths if allow_local_paths is None else allow_local_paths
        if allow_local_paths or allow_hub_ids:
            # A command line's relative path is relative to where it was typed; a file's, to the project.
            places = [local] if local.is_absolute() else [local, self.base / local] if allow_hub_ids else [self.base / local]
            for found in places:
                if (found / "config.json").is_file():
                    return ServedModel(name, str(found.resolve()))
        if allow_hub_ids:
            return ServedModel(name, str(local.resolve()) if local.exists() else name)
        known = ", ".join(sorted(self.models)) or "none configured"
        # Whether such a folder exists is not looked at, so the answer tells nothing about the disk.
        only = "" if allow_local_paths else "; only served model names are accepted here, not model folders"
        raise UnknownModelError(f"unknown model {name!r} (served models: {known}){only}")
