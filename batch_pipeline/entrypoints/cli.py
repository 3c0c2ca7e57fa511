"""`vllm-batch`: run batches from the command line.

Every command exits non-zero with a one-line message on failure; `--json` prints machine-readable output.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from pydantic import ValidationError

if TYPE_CHECKING:
    from batch_pipeline.entrypoints.api.service import BatchService
    from batch_pipeline.entrypoints.quiet_console import QuietConsole

T = TypeVar("T")


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {_with_root_cause(message)}{_log_hint()}", err=True)
    sys.exit(1)


_ROOT_CAUSE_ABOVE = "See root cause above"  # vLLM, when its engine core process failed to start


def _with_root_cause(message: str) -> str:
    # With the engine core's output in the log, "above" is not on the console: bring the cause into the line.
    quiet = _quiet_console()
    cause = quiet.first_error() if quiet is not None and _ROOT_CAUSE_ABOVE in message else None
    if cause is None:
        return message
    return f"{message[:message.index(_ROOT_CAUSE_ABOVE)].rstrip(' .')}: {cause}"


def _settings():
    from batch_pipeline.domain.settings import get_settings
    from batch_pipeline.orchestration.enabled_integrations import IntegrationError, check_integrations

    try:
        settings = get_settings()
        check_integrations(settings)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        _fail(f"invalid setting VBATCH_{str(err['loc'][0]).upper()}: {err['msg']}")
    except IntegrationError as exc:
        _fail(str(exc))
    return settings


_INTEGRATION_FLAGS = ("monitoring", "curation", "webhooks")


def integration_flags(command):
    """`--enable-monitoring`, `--enable-curation`, `--enable-webhooks`: the same as VBATCH_ENABLE_<NAME>=true."""
    for name in reversed(_INTEGRATION_FLAGS):
        command = click.option(f"--enable-{name}", f"enable_{name}", is_flag=True, expose_value=False,
                               callback=_enable_integration, help=f"Switch on the {name} integration.")(command)
    return command


def _enable_integration(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    # Through the environment, so that the daemon, the webserver and run workers started from here see it too.
    if value and param.name:
        os.environ[f"VBATCH_{param.name.upper()}"] = "true"


# Commands that run as services: what they and their children print is the service's log (journald, a shipper),
# so it stays on their stdout and stderr.
_SERVICE_COMMANDS = frozenset({"start", "serve"})
_QUIET = "vllm_batch.quiet_console"  # the command's QuietConsole in the root context's meta, when one is on


def _verbose_option() -> click.Option:
    return click.Option(["--verbose", "-v"], is_flag=True, expose_value=False, callback=_console_for_command,
                        help="Show what vLLM, torch and Dagster print here instead of in the command's log file.")


def _console_for_command(ctx: click.Context, param: click.Parameter, verbose: bool) -> None:
    # Processed after the command's other parameters, so a usage error is shown before anything moves; the
    # root context closes on every way out (errors, sys.exit), and puts the console back.
    # (Context.meta is one dict shared by the root context and every context under it.)
    ctx.meta["vllm_batch.verbose"] = verbose
    root = ctx.find_root()
    if verbose or ctx.resilient_parsing or ctx.info_name in _SERVICE_COMMANDS or _QUIET in ctx.meta:
        return
    from batch_pipeline.domain.settings import get_settings
    from batch_pipeline.entrypoints.quiet_console import QuietConsole, log_path_for

    try:
        data_dir = get_settings().resolved_data_dir
    except ValidationError:
        return  # the command reports the setting itself
    try:
        quiet = QuietConsole(log_path_for(data_dir, ctx.info_name or "command"), ctx.info_name or "command")
    except OSError as exc:  # a data folder that cannot be written: the command says so, or works without it
        click.echo(f"warning: cannot write the log file ({exc.strerror or exc}); library output shows here", err=True)
        return
    ctx.meta[_QUIET] = quiet
    root.call_on_close(lambda: _close_console(ctx.meta))


def _close_console(meta: dict[str, Any]) -> None:
    quiet = meta.pop(_QUIET)
    if quiet.wrote() and not meta.get("vllm_batch.log_shown"):
        click.echo(f"log: {_shown_path(quiet.log_path)} (what vLLM, torch and Dagster printed; -v shows it here)",
                   err=True)
    quiet.close()


def _quiet_console() -> QuietConsole | None:
    """The running command's QuietConsole; None with -v, for a service, or outside a command."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(_QUIET) if ctx else None


def _log_hint() -> str:
    """` (log: PATH)` for an error line, when the command's library output went to a log file."""
    ctx = click.get_current_context(silent=True)
    quiet = _quiet_console()
    if ctx is None or quiet is None or not quiet.wrote():
        return ""
    ctx.meta["vllm_batch.log_shown"] = True
    return f" (log: {_shown_path(quiet.log_path)})"


def _shown_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _verbose() -> bool:
    """Whether this command was given -v."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get("vllm_batch.verbose"))


class _Commands(click.Group):
    """The core commands, plus the command groups integrations add (`vllm-batch webhooks ...`), loaded on use.

    Every command gets `-v/--verbose`: without it, what its libraries print goes to a log file
    (batch_pipeline/entrypoints/quiet_console.py)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from batch_pipeline.orchestration.enabled_integrations import integration_commands

        return sorted({*super().list_commands(ctx), *integration_commands()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        from batch_pipeline.orchestration.enabled_integrations import integration_commands, load_attribute

        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in integration_commands():
            command = load_attribute(integration_commands()[cmd_name])
        if command is not None and not any(param.name == "verbose" for param in command.params):
            command.params.append(_verbose_option())
        return command


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run OpenAI-format batch files through vLLM as a Dagster pipeline."""


@main.command()
@click.argument("input_file", type=click.Path(path_type=str))
@click.option("--model", "-m", required=True, help="Model to load: a local directory or a hub id.")
@click.option("--model-name", help="Name reported in responses (default: the --model value).")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Copy output.jsonl and errors.jsonl here.")
@click.option("--batch-id", help="Partition key for the batch (default: derived from the file and model).")
@click.option("--chunk-size", type=click.IntRange(1), help="Requests per chunk (default: VBATCH_CHUNK_SIZE).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@integration_flags
def run(input_file: str, model: str, model_name: str | None, output: Path | None, batch_id: str | None,
        chunk_size: int | None, as_json: bool) -> None:
    """Materialise one batch end to end on the configured instance and print where the results are.

    INPUT_FILE is a local file, or an s3:// or gs:// URI (downloaded first; needs the s3 / gcs extra).
    """
    settings = _settings()
    _run_batch(settings, _input_path(settings, input_file), model, model_name, output, batch_id, chunk_size, as_json)


def _run_batch(settings, local_input: Path, model: str, model_name: str | None, output: Path | None,
               batch_id: str | None, chunk_size: int | None, as_json: bool, *,
               engine_args: dict[str, Any] | None = None, metadata: dict[str, str] | None = None) -> None:
    """`vllm-batch run`'s work, shared with `vllm-batch replay` (which gives the recorded per-model
    engine arguments and marks the new batch as a replay in its metadata)."""
    from batch_pipeline.domain.instance import InstanceConfigError, open_instance
    from batch_pipeline.entrypoints.local_run import (
        BatchRunError,
        cache_answers_head,
        check_local_batch,
        one_process,
        register_local_batch,
        run_batch_in_process,
    )

    try:
        checked_input, served = check_local_batch(settings, local_input, model, model_name, batch_id, engine_args)
    except BatchRunError as exc:
        _fail(str(exc))
    from batch_pipeline.domain.chunks import engine_args_for
    from batch_pipeline.domain.intake import HEAD_LINES, survey
    from batch_pipeline.domain.status import ChunkStats
    from batch_pipeline.entrypoints.console import ProgressDisplay, ProgressWatcher, Snapshot
    from batch_pipeline.orchestration.definitions import build_resources
    from resources.engine_types import EngineLoadError
    from resources.storage import BatchStorage, download
    from resources.vllm_engine import VLLMEngine

    # The engine load is the longest wait of a run: it starts first, and opening the instance, registering
    # the batch, Dagster's run start and the validation all happen while it loads. The file's first lines
    # tell the engine kind (pooling or generative), so the prefetched engine is the one batch_chunks asks
    # for and the batch loads exactly one engine.
    head = survey(checked_input, settings.max_line_bytes, HEAD_LINES)
    # The engine loads here and ends with the command (VBATCH_ENGINE_HOST unset); the instance keeps the
    # service's settings (its pool limits), so open_instance below is given those.
    engine = build_resources(one_process(settings))["engine"]
    started = time.monotonic()  # the run's time counts from here: the engine load begins before the run does
    engine_ready: list[float] = []  # when the prefetched engine finished loading (time.monotonic())
    try:
        engine_args = engine_args_for(served.engine_args, head.url_counts)
        # Data parallel engines load in batch_chunks' worker processes; a file whose head the response cache
        # answers may need no engine at all.
        prefetched = not engine.data_parallel() and not cache_answers_head(settings, engine, served, checked_input,
                                                                           engine_args)
        if prefetched:
            loading = engine.prefetch(served.model, engine_args)
            loading.add_done_callback(lambda _: engine_ready.append(time.monotonic()))
    except EngineLoadError as exc:  # GPU settings that do not fit this machine
        _fail(str(exc))
    try:
        instance = open_instance(settings)
        spec = register_local_batch(settings, instance, local_input, model, model_name, batch_id, chunk_size,
                                    engine_args=engine_args, metadata=metadata)
    except (InstanceConfigError, BatchRunError) as exc:
        VLLMEngine.discard()
        _fail(str(exc))
    from batch_pipeline.domain.estimate import Estimator

    Estimator(settings, instance).at_creation(spec, checked_input)  # its work, for the model's history
    display = ProgressDisplay(spec.batch_id)
    paths = BatchStorage(data_dir=settings.data_root).batch(spec.batch_id)
    stats = ChunkStats()

    runnable: list[float] = []  # when the batch's chunks were first there to run (time.monotonic())

    def snapshot() -> Snapshot | None:
        counts = stats.progress(paths)
        if counts is None:
            return None
        if not runnable:
            runnable.append(time.monotonic())
        if counts.total and counts.completed + counts.failed == counts.total and not measured:
            return None  # every chunk written: the last line waits for the run's own tokens/s (the summary's)
        # Generation begins once both the chunks and the engine are there, as the run's summary counts it.
        since = max(runnable + engine_ready) if engine_ready or not prefetched else None
        return Snapshot(counts.completed + counts.failed, counts.total, counts.completion_tokens,
                        generating_since=since, tokens_per_second=measured[0] if measured else None)

    # The run's own tokens/s once it ended: the last progress line then says what the summary says (polls
    # half a second apart cannot time a generation of a second or two).
    measured: list[float] = []

    # The console shows the run's warnings (rejected lines, failed chunks); -v adds every step's lines.
    log_level = "DEBUG" if _verbose() else "WARNING"
    with ProgressWatcher(display, snapshot):
        result = run_batch_in_process(settings, instance, spec.batch_id, log_level=log_level,
                                      quiet=_quiet_console() is not None)
        if result.success:
            measured.append(float(result.summary.get("completion_tokens_per_second") or 0.0))
    if not result.success:
        # The batch may have failed before its engine was used (a bad file): stop the load first.
        VLLMEngine.discard()
        _fail(f"batch {spec.batch_id} failed: {result.error}")
    if result.integration_error:
        click.echo(f"warning: an integration failed (the batch's results are complete): {result.integration_error}",
                   err=True)
    summary = dict(result.summary, run_id=result.run_id, seconds=round(time.monotonic() - started, 2))
    if output:
        output.mkdir(parents=True, exist_ok=True)
        for name, source in (("output.jsonl", result.paths.output), ("errors.jsonl", result.paths.errors)):
            download(source, output / name)
        summary["output_file"] = str(output / "output.jsonl")
        summary["error_file"] = str(output / "errors.jsonl")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    from_cache = f" ({summary['from_cache']} from the response cache)" if summary.get("from_cache") else ""
    click.echo(f"batch {spec.batch_id}: {summary['completed']} completed{from_cache}, {summary['failed']} failed "
               f"in {summary['seconds']:.1f}s (engine load {summary.get('engine_load_seconds', 0):.1f}s, "
               f"{summary.get('completion_tokens_per_second', 0):.0f} generated tokens/s)")
    click.echo(f"output: {summary['output_file']}")
    click.echo(f"errors: {summary['error_file']}")


@main.command()
@click.argument("batch_id")
@click.option("--batch-id", "new_batch_id", help="Id of the new batch (default: BATCH_ID-replay-N).")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Copy output.jsonl and errors.jsonl here.")
@click.option("--strict", is_flag=True, help="Refuse to run when the model, versions or machine differ.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def replay(batch_id: str, new_batch_id: str | None, output: Path | None, strict: bool, as_json: bool) -> None:
    """Run a finished batch again from its replay record, as a new batch: the same input file (checked
    by its sha256), model, engine settings, seed and chunk size. Warns when the model's files, the
    versions of vLLM, torch or this project, or the machine differ from the record."""
    settings = _settings()
    from batch_pipeline.domain.batches import BatchNotFound, BatchRecordError, existing_batch, file_digest
    from batch_pipeline.domain.replay import differences, load_replay_record
    from resources.storage import local_copy

    try:
        paths = existing_batch(settings.data_root, batch_id)
        record = load_replay_record(paths)
    except BatchNotFound:
        _fail(f"no batch with id {batch_id!r}")
    except BatchRecordError as exc:
        _fail(str(exc))
    if record is None:
        _fail(f"batch {batch_id} has no replay record: only a batch that finished (with this version or later) has one")
    source = paths.root.joinpath(record.input_path)
    with local_copy(source) as local_input:
        try:
            digest = file_digest(local_input)
        except OSError as exc:
            _fail(f"cannot read the input file {source}: {exc.strerror or exc}")
        if digest != record.input_sha256:
            _fail(f"the input file {source} changed since batch {batch_id} ran (sha256 {digest[:12]}, "
                  f"recorded {record.input_sha256[:12]})")
        changed = differences(record)
        for line in changed:
            click.echo(f"warning: {line}", err=True)
        if changed and strict:
            _fail(f"not replaying batch {batch_id} with --strict: {len(changed)} difference(s) above")
        replay_settings = settings.model_copy(update=record.engine_settings)
        new_id = new_batch_id or _replay_id(settings, batch_id)
        if not as_json:
            click.echo(f"replaying {batch_id} as {new_id}", err=True)
        # An object-store input is run from its local copy: registration uploads it beside the new batch.
        _run_batch(replay_settings, local_input, record.model, record.model_name, output, new_id, record.chunk_size,
                   as_json,
                   engine_args=record.model_engine_args, metadata={"replay_of": batch_id})


def _replay_id(settings, batch_id: str) -> str:
    """`BATCH_ID-replay-N` for the first N whose batch does not exist yet."""
    from resources.storage import BatchStorage

    storage = BatchStorage(data_dir=settings.data_root)
    stem = batch_id[:100]
    number = 1
    while storage.batch(f"{stem}-replay-{number}").spec.exists():
        number += 1
    return f"{stem}-replay-{number}"


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the Dagster UI listens on.")
@click.option("--port", default=3000, show_default=True, type=click.IntRange(1, 65535), help="Port of the Dagster UI.")
@integration_flags
def start(host: str, port: int) -> None:
    """Start the Dagster webserver and daemon on the configured instance and keep them running."""
    from batch_pipeline.domain.instance import InstanceConfigError
    from batch_pipeline.entrypoints.supervisor import AlreadyRunning, run_service

    settings = _settings()
    echo = click.echo
    if settings.log_format == "json":
        from batch_pipeline.domain.log_format import json_echo, use_json_logging

        use_json_logging("supervisor", "WARNING")
        echo = json_echo("supervisor")
    try:
        sys.exit(run_service(settings, host, port, echo=echo))
    except (InstanceConfigError, AlreadyRunning) as exc:
        _fail(str(exc))


@main.command("tiny-model")
@click.argument("target", type=click.Path(path_type=Path), default=Path("models/tiny-llama"))
def tiny_model(target: Path) -> None:
    """Build the tiny random-weight Llama used by the tests and the demo (no download needed)."""
    from batch_pipeline.domain.tiny_model import build_tiny_model

    click.echo(str(build_tiny_model(target).resolve()))



# ---- the queue: submit, status, list, results, cancel, serve ------------------------------------
# These go through batch_pipeline.entrypoints.api.service, the same code the API server uses, so a status shown
# here is the status the API reports.


def _input_path(settings, value: str) -> Path:
    """A local input file as given; an s3:// or gs:// URI is downloaded (streamed) into DATA_DIR/inputs/ first."""
    from batch_pipeline.orchestration.enabled_integrations import IntegrationError, input_path

    try:
        return input_path(settings, value)
    except IntegrationError as exc:
        _fail(str(exc))


def _service() -> BatchService:
    settings = _settings()
    from batch_pipeline.domain.instance import InstanceConfigError, open_instance
    from batch_pipeline.entrypoints.api.service import BatchService

    try:
        return BatchService(settings, open_instance(settings))
    except InstanceConfigError as exc:
        _fail(str(exc))


def _call(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a service call; its known errors become one line and exit code 1."""
    from batch_pipeline.domain.batches import BatchNotFound
    from batch_pipeline.entrypoints.api.files import FileNotFound
    from batch_pipeline.entrypoints.api.service import BatchRequestError

    try:
        return function(*args, **kwargs)
    except BatchNotFound as exc:
        _fail(f"no batch with id {str(exc)!r}")
    except FileNotFound as exc:
        _fail(f"no such file: {exc}")
    except BatchRequestError as exc:
        _fail(str(exc))


def _print_batch(batch, as_json: bool) -> None:
    if as_json:
        click.echo(batch.model_dump_json(indent=2))
        return
    counts = batch.request_counts
    click.echo(f"{batch.id}  {batch.status}  {counts.completed} completed, {counts.failed} failed of {counts.total}"
               f"  ({batch.usage.output_tokens} output tokens)")
    for error in (batch.errors.data if batch.errors else []):
        click.echo(f"  error: {error.message}")
    estimate = batch.completion_estimate
    if estimate is not None and batch.status not in ("completed", "failed", "expired", "cancelled"):
        click.echo(f"  {_estimate_line(estimate)}")


def _estimate_line(estimate) -> str:
    """`expected to finish at 14:02:31 (in 95s; 2 batches ahead, 1830 output tokens/s)`, or why there is no estimate."""
    if estimate.expected_completed_at is None:
        return f"no finishing estimate: {estimate.reason}"
    at = time.strftime("%H:%M:%S", time.localtime(estimate.expected_completed_at))
    return (f"expected to finish at {at} (in {max(estimate.expected_completed_at - time.time(), 0):.0f}s; "
            f"{estimate.queued_ahead} batches ahead, {estimate.tokens_per_second:.0f} output tokens/s measured)")


def _wait(service: BatchService, batch_id: str, interval: float):
    """Poll until the batch is finished, showing its progress on stderr."""
    from batch_pipeline.entrypoints.api.schemas import TERMINAL_STATUSES
    from batch_pipeline.entrypoints.console import ProgressDisplay, Snapshot

    with ProgressDisplay(batch_id) as display:
        while True:
            progress = _call(service.progress, batch_id)
            # The batch's chunks step began (its engine load, unless the warm host had it, counts too).
            since = None if progress.started_at is None else time.monotonic() - (time.time() - progress.started_at)
            display.show(Snapshot(progress.done, progress.total, progress.output_tokens, progress.batch.status,
                                  generating_since=since))
            if progress.batch.status in TERMINAL_STATUSES:
                return progress.batch
            time.sleep(interval)


def _finish(batch, as_json: bool) -> None:
    _print_batch(batch, as_json)
    if batch.status != "completed":
        reason = batch.errors.data[0].message if batch.errors and batch.errors.data else batch.status
        _fail(f"batch {batch.id} {batch.status}: {reason}")


@main.command()
@click.argument("input_file", type=click.Path(path_type=str))
@click.option("--model", "-m", required=True, help="A served model name (models file) or a local model directory.")
@click.option("--batch-id", help="Partition key for the batch (default: derived from the file and model).")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="Metadata to keep with the batch; repeatable.")
@click.option("--wait", is_flag=True, help="Wait for the batch, with a progress bar; exit 1 unless it completes.")
@click.option("--interval", type=click.FloatRange(0.1), default=2.0, show_default=True, help="Seconds between polls.")
@click.option("--json", "as_json", is_flag=True, help="Print the Batch object as JSON.")
def submit(input_file: str, model: str, batch_id: str | None, metadata: tuple[str, ...], wait: bool,
           interval: float, as_json: bool) -> None:
    """Queue a batch file for the daemon (`dagster-daemon` or `vllm-batch start` must be running).

    INPUT_FILE is a local file, or an s3:// or gs:// URI (downloaded first; needs the s3 / gcs extra).
    """
    pairs = {}
    for item in metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--metadata takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    service = _service()
    batch = _call(service.submit_file, _input_path(service.settings, input_file), model, batch_id, pairs)
    if not wait:
        _print_batch(batch, as_json)
        return
    if not as_json:
        click.echo(f"queued {batch.id}", err=True)
    _finish(_wait(service, batch.id, interval), as_json)


@main.command()
@click.argument("batch_id")
@click.option("--wait", is_flag=True, help="Wait for the batch, with a progress bar; exit 1 unless it completes.")
@click.option("--interval", type=click.FloatRange(0.1), default=2.0, show_default=True, help="Seconds between polls.")
@click.option("--json", "as_json", is_flag=True, help="Print the Batch object as JSON.")
def status(batch_id: str, wait: bool, interval: float, as_json: bool) -> None:
    """Show a batch's status, request counts and token usage."""
    service = _service()
    if wait:
        _finish(_wait(service, batch_id, interval), as_json)
        return
    _print_batch(_call(service.describe, batch_id), as_json)


@main.command("list")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.option("--after", help="List the batches after this id (the last id of the previous page).")
@click.option("--json", "as_json", is_flag=True, help="Print the page as JSON (OpenAI's list shape).")
def list_batches(limit: int, after: str | None, as_json: bool) -> None:
    """List batches, newest first, however they were started (API, CLI, UI, sensor)."""
    page = _call(_service().list, limit, after)
    if as_json:
        click.echo(page.model_dump_json(indent=2))
        return
    for batch in page.data:
        counts = batch.request_counts
        click.echo(f"{batch.id}  {batch.status:<11} {counts.completed + counts.failed}/{counts.total}  "
                   f"{batch.model or ''}")
    if page.has_more:
        click.echo(f"(more: vllm-batch list --after {page.last_id})")


@main.command()
@click.argument("batch_id")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write the file here instead of stdout.")
@click.option("--errors", "which", flag_value="errors", help="The error file instead of the output file.")
@click.option("--partial", is_flag=True,
              help="While the batch runs: the output lines of its chunks finished so far (a prefix of the final file).")
@click.option("--json", "as_json", is_flag=True, help="With -o: print where the file went, as JSON.")
def results(batch_id: str, output: Path | None, which: str | None, partial: bool, as_json: bool) -> None:
    """Print (or save) a finished batch's output file, or its error file with --errors."""
    import shutil

    from resources.storage import download

    kind = which or "output"
    service = _service()
    if partial:
        if which == "errors":
            _fail("--partial gives output lines only; the error file is written when the batch ends")
        _write_lines(_call(service.partial_output, batch_id), output, batch_id, as_json)
        return
    path = _call(service.result_path, batch_id, kind)
    if path is None:
        batch = _call(service.describe, batch_id)
        _fail(f"batch {batch_id} has no {kind} file (status {batch.status})")
    if output is None:
        with path.open("rb") as handle:
            shutil.copyfileobj(handle, sys.stdout.buffer)
        return
    try:
        download(path, output)
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror or exc}")
    if as_json:
        click.echo(json.dumps({"batch_id": batch_id, "kind": kind, "path": str(output.resolve()),
                               "bytes": output.stat().st_size}))
    else:
        click.echo(str(output))


def _write_lines(lines: Iterator[str], output: Path | None, batch_id: str, as_json: bool) -> None:
    """Write output lines to stdout or, atomically, to `output`."""
    from resources.storage import atomic_path

    if output is None:
        for line in lines:
            sys.stdout.write(line)
        sys.stdout.flush()
        return
    count = 0
    try:
        with atomic_path(output.resolve()) as tmp, tmp.open("w") as handle:
            for line in lines:
                handle.write(line)
                count += 1
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror or exc}")
    if as_json:
        click.echo(json.dumps({"batch_id": batch_id, "kind": "output", "partial": True, "lines": count,
                               "path": str(output.resolve()), "bytes": output.stat().st_size}))
    else:
        click.echo(str(output))


@main.command()
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print the Batch object as JSON.")
def cancel(batch_id: str, as_json: bool) -> None:
    """Cancel a queued or running batch; what it finished stays in its output file."""
    _print_batch(_call(_service().cancel, batch_id), as_json)


@main.command()
@click.option("--host", help="Address to bind (default: VBATCH_API_HOST, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default: VBATCH_API_PORT, 8000).")
@click.option("--json", "as_json", is_flag=True, help="Print the address as JSON before serving.")
def serve(host: str | None, port: int | None, as_json: bool) -> None:
    """Serve the OpenAI-compatible Batch API (files, batches, models) on HTTP."""
    settings = _settings()
    try:
        import uvicorn

        from batch_pipeline.entrypoints.api.app import create_app
    except ImportError as exc:
        _fail(f"the API server needs the 'api' extra (pip install 'vllm-batch-pipeline[api]'): {exc}")
    try:
        keys = settings.api_key_set()
    except OSError as exc:
        _fail(f"cannot read VBATCH_API_KEYS_FILE: {exc.strerror or exc}")
    try:
        keys |= settings.admin_key_set()
    except OSError as exc:
        _fail(f"cannot read VBATCH_ADMIN_API_KEYS_FILE: {exc.strerror or exc}")
    if not keys:
        _fail("no API keys configured: set VBATCH_API_KEYS (comma-separated) or VBATCH_API_KEYS_FILE")
    host, port = host or settings.api_host, port or settings.api_port
    log_config: dict[str, Any] | None = None
    if settings.log_format == "json":
        from batch_pipeline.domain.log_format import json_echo, logging_config, use_json_logging

        use_json_logging("api", "WARNING")
        log_config = logging_config("api", "WARNING")
        json_echo("api")(f"serving the Batch API on http://{host}:{port}/v1")
    if as_json:
        click.echo(json.dumps({"url": f"http://{host}:{port}/v1"}))
    elif log_config is None:
        click.echo(f"serving the Batch API on http://{host}:{port}/v1", err=True)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning",
                log_config=log_config or uvicorn.config.LOGGING_CONFIG)

if __name__ == "__main__":
    main()
