"""`VBATCH_LOG_FORMAT=json`: every log line as one JSON object, so a shipper (Promtail, Vector, Alloy) can label it.

Each object has `time`, `level`, `process` (run, daemon, webserver, api, supervisor, ...), `logger`,
`message`, and, when known, `batch_id`, `run_id`, `step`, `event` (the Dagster event type) and `chunk`.
Three pieces: a Dagster `console` logger for runs (it replaces the default one, so a run's lines carry
the run id and the batch id from the run's partition tag), a `logging.Formatter` for the API server and
the supervisor, and `relay_json_lines`, with which `vllm-batch start` passes on what the webserver and
daemon (and the code servers and run workers under them) print: their JSON lines normalised, anything
else (vLLM's own lines, a traceback) wrapped into an object.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Iterable
from typing import IO, Any

from dagster import Field, InitLoggerContext, logger

from batch_pipeline.domain.constants import BATCH_ID_TAG, PARTITION_TAG

_LEVELS = ("critical", "error", "warning", "info", "debug")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def log_object(level: str, message: str, process: str, **fields: Any) -> dict[str, Any]:
    """One log line's object: the fixed keys first, then what is known (None values left out)."""
    line = {"time": _now(), "level": level.lower(), "process": process, "message": message}
    line.update({key: value for key, value in fields.items() if value is not None})
    return line


class JsonLogFormatter(logging.Formatter):
    """A log record as one JSON line; reads Dagster's metadata on run records (`dagster_meta`) and `extra`s."""

    def __init__(self, process: str = "vllm-batch"):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        meta = getattr(record, "dagster_meta", None) or {}
        tags = meta.get("job_tags") or {}
        event = meta.get("dagster_event")
        message = meta.get("orig_message", record.getMessage())
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        line = log_object(
            record.levelname, message, getattr(record, "process_name", None) or self.process,
            logger=record.name,
            batch_id=getattr(record, "batch_id", None) or tags.get(BATCH_ID_TAG) or tags.get(PARTITION_TAG),
            run_id=meta.get("run_id"), job=meta.get("job_name"), step=meta.get("step_key"),
            event=getattr(event, "event_type_value", None), chunk=_chunk_of(record, event))
        return json.dumps(line, default=str)


def _chunk_of(record: logging.LogRecord, event: Any) -> int | None:
    chunk = getattr(record, "chunk", None)
    if chunk is None and event is not None:  # a chunk's AssetObservation (batch_chunks records its index)
        observation = getattr(getattr(event, "event_specific_data", None), "asset_observation", None)
        value = (getattr(observation, "metadata", None) or {}).get("chunk")
        chunk = getattr(value, "value", value)
    return chunk if isinstance(chunk, int) else None


@logger(
    {"log_level": Field(str, is_required=False, default_value="INFO"),
     "name": Field(str, is_required=False, default_value="dagster")},
    description="The run's log lines as JSON objects on stderr (VBATCH_LOG_FORMAT=json).",
)
def json_console_logger(init_context: InitLoggerContext) -> logging.Logger:
    """Dagster's `console` logger, writing JSON lines: used for every run when VBATCH_LOG_FORMAT=json."""
    config = init_context.logger_config
    run_logger = logging.Logger(config["name"], level=config["log_level"].upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter("run"))
    run_logger.addHandler(handler)
    return run_logger


def json_logs_for_every_run() -> None:
    """Make JSON the fallback logger of every run this process executes, however it was launched.

    Dagster builds a run's `console` logger from the job's loggers only when the run config names it
    (`vllm-batch run` does); runs launched by the daemon (queued batches, automation, the UI) carry no
    logger config and fall back to `default_system_loggers`, the coloured console logger. Dagster has no
    setting for that fallback, so the run worker (which imports the definitions before it builds its
    loggers) swaps it here; the swap is skipped, with a warning, if a Dagster release moves it.
    """
    from dagster._core.execution import context_creation_job

    if not hasattr(context_creation_job, "default_system_loggers"):
        logging.getLogger(__name__).warning("VBATCH_LOG_FORMAT=json: this Dagster version's default run logger "
                                            "could not be replaced; runs launched without logger config log as text")
        return

    def json_system_loggers(instance: Any) -> list[tuple[Any, dict[str, Any]]]:
        level = getattr(instance, "python_log_level", None) or "INFO"
        return [(json_console_logger, {"name": "dagster", "log_level": level})]

    context_creation_job.default_system_loggers = json_system_loggers


def logging_config(process: str, level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` (uvicorn's `log_config`) that writes every record as JSON to stderr."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonLogFormatter, "process": process}},
        "handlers": {"json": handler},
        "root": {"handlers": ["json"], "level": level},
        "loggers": {name: {"handlers": ["json"], "level": level, "propagate": False}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def use_json_logging(process: str, level: str = "INFO") -> None:
    """Every record of this process's Python loggers, and its warnings, as JSON lines on stderr."""
    import logging.config

    logging.config.dictConfig(logging_config(process, level))
    logging.captureWarnings(True)


def json_echo(process: str, stream: IO[str] | None = None):
    """An `echo(text)` that writes each message as one JSON log line (the supervisor's own lines)."""
    def echo(text: str) -> None:
        out = stream or sys.stderr
        out.write(json.dumps(log_object("info", str(text), process)) + "\n")
        out.flush()
    return echo


def as_json_line(text: str, process: str) -> str:
    """One line another process printed, as a JSON object: its own JSON (normalised), or the text wrapped."""
    text = text.rstrip("\r\n")
    try:
        parsed = json.loads(text) if text.startswith("{") else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        # Dagster's own JSON (`--log-format json`, structlog) says `event` and `timestamp`.
        if "message" not in parsed and "event" in parsed:
            parsed["message"] = parsed.pop("event")
        if "time" not in parsed and "timestamp" in parsed:
            parsed["time"] = parsed.pop("timestamp")
        parsed["level"] = str(parsed.get("level") or "info").lower()
        parsed.setdefault("time", _now())
        parsed.setdefault("message", "")
        parsed.setdefault("process", process)
        return json.dumps(parsed, default=str)
    return json.dumps(log_object(_level_in(text), text, process))


def _level_in(text: str) -> str:
    # vLLM prints "INFO 11-26 ...", "WARNING ..."; Python's default format "ERROR:name:..."; a traceback line none.
    head = text[:40].lower()
    return next((level for level in _LEVELS if level in head), "info")


def relay_json_lines(source: Iterable[bytes], process: str, out: IO[str]) -> None:
    """Copy a child's output to `out` as JSON lines until it closes (run in a thread per child)."""
    for raw in source:
        line = raw.decode("utf-8", errors="replace")
        if line.strip():
            out.write(as_json_line(line, process) + "\n")
            out.flush()
