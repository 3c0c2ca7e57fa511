"""The environment of a `vllm-batch` (or `dagster`) process a test starts."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from tests.support.files import REPO

# The CPU build of vLLM on the tiny model (see docs/ARCHITECTURE.md).
CPU_ENGINE = {
    "VBATCH_DTYPE": "float32",
    "VBATCH_ENFORCE_EAGER": "true",
    "VBATCH_MAX_MODEL_LEN": "1024",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


def clean_environ() -> dict[str, str]:
    """This process's environment without the product's settings (VBATCH_*, DAGSTER_*) that a user's shell may
    hold; the test hooks (VBATCH_TEST_*) stay, the suite's engine count reads them."""
    return {key: value for key, value in os.environ.items()
            if key.startswith("VBATCH_TEST_") or not key.startswith(("VBATCH_", "VLLM_BATCH_", "DAGSTER_"))}


def instance_env(root: Path, **extra: str) -> dict[str, str]:
    """A process of its own instance in `root` (data in root/data, DAGSTER_HOME root/dagster) on the CPU engine,
    plus `extra`."""
    return {**clean_environ(), "VBATCH_HOME": str(REPO), "VBATCH_DATA_DIR": str(root / "data"),
            "DAGSTER_HOME": str(root / "dagster"), **CPU_ENGINE, **extra}


def models_file(root: Path, models: dict[str, Path | str]) -> Path:
    """root/models.yaml naming each model's folder."""
    path = root / "models.yaml"
    path.write_text(yaml.safe_dump({"models": {name: {"path": str(folder)} for name, folder in models.items()}}))
    return path
