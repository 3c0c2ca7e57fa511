"""Taking a batch in: the file checks, the model it runs, its id, its spec and its partition.

Every way in goes through here: `vllm-batch run`, `vllm-batch submit`, the API's `POST /v1/batches`
and the inbox sensor. So there is one batch-id rule, one model resolution and one set of file checks,
and a batch registered one way is the same batch registered another way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from dagster import DagsterInstance

from batch_pipeline.domain.batches import BatchSpec, default_batch_id, load_spec, save_spec, valid_batch_id
from batch_pipeline.domain.constants import BATCHES_PARTITIONS
from batch_pipeline.domain.input_file import raw_lines
from batch_pipeline.domain.models import ModelConfigError, ModelRegistry, ServedModel, UnknownModelError
from batch_pipeline.domain.settings import Settings
from resources.storage import BatchStorage, is_local, upload


class IntakeError(Exception):
    """The batch cannot be taken in; `param` and `code` say which input is at fault, for API errors."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


def checked_input(path: Path) -> Path:
    """The input file, absolute, once it is known to exist and hold something."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise IntakeError(f"input file not found: {path}", "input_file", "file_not_found")
    if path.stat().st_size == 0:
        raise IntakeError(f"input file is empty: {path}", "input_file", "invalid_file")
    if survey(path, 1 << 20, max_lines=1).lines == 0:
        raise IntakeError(f"input file {path} is empty: it has no request lines", "input_file", "invalid_file")
    return path


@dataclass
class FileSurvey:
    """What a quick read of a batch file's lines shows (each line is fully validated later, by batch_input)."""

    lines: int = 0
    objects: int = 0
    models: dict[str, int] = field(default_factory=dict)  # body.model -> first line naming it, in file order
    urls: dict[str, int] = field(default_factory=dict)  # url -> first line using it
    url_counts: dict[str, int] = field(default_factory=dict)  # url -> lines using it

    @property
    def first_url(self) -> str | None:
        return next(iter(self.urls), None)


def survey(path: Path, max_line_bytes: int, max_lines: int | None = None) -> FileSurvey:
    """The models and endpoints a file names, reading at most `max_lines` non-blank lines."""
    found = FileSurvey()
    # The same line reader as the full validation (BOM, CRLF, over-long lines), and a C decoder.
    for number, raw in raw_lines(path, max_line_bytes):
        if max_lines is not None and found.lines >= max_lines:
            break
        if raw is not None and not raw.strip():
            continue
        found.lines += 1
        try:
            obj = msgspec.json.decode(raw) if raw is not None else None
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            continue  # a bad line is the pipeline's business: it becomes an error record
        if not isinstance(obj, dict):
            continue
        found.objects += 1
        if isinstance(obj.get("url"), str):
            found.urls.setdefault(obj["url"], number)
            found.url_counts[obj["url"]] = found.url_counts.get(obj["url"], 0) + 1
        body = obj.get("body")
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            found.models.setdefault(body["model"], number)
    return found


# How far into a file the API looks for the model and endpoint a batch names.
HEAD_LINES = 1000


def model_for_endpoint(settings: Settings, path: Path, endpoint: str) -> ServedModel:
    """The model an uploaded file names (the first line naming one binds the batch), checking that its
    first lines all use the batch's endpoint; the default model (VBATCH_MODEL) if none names one."""
    head = survey(path, settings.max_line_bytes, HEAD_LINES)
    for url, line in head.urls.items():
        if url != endpoint:
            raise IntakeError(f"line {line} has url {url!r}, but the batch endpoint is {endpoint!r}",
                              "endpoint", "invalid_file")
    name = next(iter(head.models), None) or settings.model
    if not name:
        raise IntakeError(f"no request in the first {HEAD_LINES} lines names body.model, and no default model "
                          "is configured (VBATCH_MODEL)", "input_file_id", "invalid_file")
    # Only the API takes files this way: a model folder named by a request needs the API's own opt-in;
    # the default model is the operator's choice.
    trusted = name == settings.model or settings.api_allow_local_model_paths
    return resolve_model(settings, name, param="input_file_id", allow_local_paths=trusted)


def resolve_model(settings: Settings, name: str, *, allow_hub_ids: bool = False, param: str = "model",
                  allow_local_paths: bool | None = None) -> ServedModel:
    """The served model for a name: the models file first, then a local model folder (if allowed:
    default VBATCH_ALLOW_LOCAL_MODEL_PATHS), then (if allowed, as `vllm-batch run` does) a hub id."""
    try:
        return ModelRegistry.from_settings(settings).resolve(name, allow_hub_ids=allow_hub_ids,
                                                             allow_local_paths=allow_local_paths)
    except ModelConfigError as exc:
        raise IntakeError(str(exc)) from None
    except UnknownModelError as exc:
        raise IntakeError(str(exc), param, "model_not_found") from None


def register(settings: Settings, instance: DagsterInstance, input_path: Path, served: ServedModel, *,
             source: str, batch_id: str | None = None, chunk_size: int | None = None,
             metadata: dict[str, str] | None = None, rejected: str | None = None,
             rejected_code: str | None = None) -> BatchSpec:
    """Write the batch's spec and add its partition (idempotent: registering again keeps its history)."""
    batch_id = batch_id or default_batch_id(input_path, served.model)
    if not valid_batch_id(batch_id):
        raise IntakeError(f"invalid batch id {batch_id!r}: use letters, digits, '_', '-' and '.'", "batch_id")
    paths = BatchStorage(data_dir=settings.data_root).batch(batch_id)
    stored_input = str(input_path)
    if not is_local(paths.root) and input_path.is_file():
        # Runs on other hosts read the batch from the object store: the file goes beside the batch
        # (relative paths are read relative to the batch's folder).
        stored_input = "input/source.jsonl"
        upload(input_path, paths.source)
    spec = BatchSpec(batch_id=batch_id, input_path=stored_input, model=served.model, model_name=served.name,
                     engine_args=served.engine_args, chunk_size=chunk_size or settings.chunk_size, source=source,
                     metadata=metadata or {}, rejected=rejected, rejected_code=rejected_code)
    if paths.spec.exists():
        spec = spec.model_copy(update={"created_at": load_spec(paths).created_at})
    save_spec(paths, spec)
    if not instance.has_dynamic_partition(BATCHES_PARTITIONS, batch_id):
        instance.add_dynamic_partitions(BATCHES_PARTITIONS, [batch_id])
    return spec
