"""`vllm-batch`: run batches from the command line.

Every command exits non-zero with a one-line message on failure; `--json` prints machine-readable output.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
from pydantic import ValidationError


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _settings():
    from batch_pipeline.settings import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        _fail(f"invalid setting VLLM_BATCH_{str(err['loc'][0]).upper()}: {err['msg']}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run OpenAI-format batch files through vLLM as a Dagster pipeline."""


@main.command()
@click.argument("input_file", type=click.Path(path_type=Path))
@click.option("--model", "-m", required=True, help="Model to load: a local directory or a hub id.")
@click.option("--model-name", help="Name reported in responses (default: the --model value).")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Copy output.jsonl and errors.jsonl here.")
@click.option("--batch-id", help="Partition key for the batch (default: derived from the file and model).")
@click.option("--chunk-size", type=click.IntRange(1), help="Requests per chunk (default: VLLM_BATCH_CHUNK_SIZE).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--verbose", "-v", is_flag=True, help="Show vLLM's and Dagster's logs.")
def run(input_file: Path, model: str, model_name: str | None, output: Path | None, batch_id: str | None,
        chunk_size: int | None, as_json: bool, verbose: bool) -> None:
    """Materialise one batch end to end on the configured instance and print where the results are."""
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    settings = _settings()
    input_file = input_file.resolve()
    if not input_file.is_file():
        _fail(f"input file not found: {input_file}")
    if input_file.stat().st_size == 0:
        _fail(f"input file is empty: {input_file}")
    from batch_pipeline.batches import BatchSpec, default_batch_id, register_batch, valid_batch_id
    from batch_pipeline.instance import InstanceConfigError, open_instance
    from resources.storage import BatchStorage

    model_path = Path(model)
    model_ref = str(model_path.resolve()) if model_path.exists() else model
    batch_id = batch_id or default_batch_id(input_file, model_ref)
    if not valid_batch_id(batch_id):
        _fail(f"invalid batch id {batch_id!r}: use letters, digits, '_', '-' and '.'")
    try:
        instance = open_instance(settings)
    except InstanceConfigError as exc:
        _fail(str(exc))
    storage = BatchStorage(data_dir=str(settings.resolved_data_dir))
    paths = storage.batch(batch_id)
    spec = BatchSpec(batch_id=batch_id, input_path=str(input_file), model=model_ref,
                     model_name=model_name or model, chunk_size=chunk_size or settings.chunk_size)
    if paths.spec.exists():
        from batch_pipeline.batches import load_spec

        previous = load_spec(paths)
        spec = spec.model_copy(update={"created_at": previous.created_at})
    register_batch(instance, paths, spec)

    from batch_pipeline.definitions import defs

    started = time.perf_counter()
    result = defs.resolve_job_def("batch_job").execute_in_process(
        instance=instance, partition_key=batch_id, raise_on_error=False,
        tags={"vllm_batch/source": "cli"},
    )
    elapsed = time.perf_counter() - started
    if not result.success:
        _fail(f"batch {batch_id} failed: {_failure_message(result)}")
    summary = json.loads(paths.summary.read_text())
    summary["run_id"] = result.run_id
    summary["seconds"] = round(elapsed, 2)
    chunk_meta = result.asset_materializations_for_node("batch_chunks")
    if chunk_meta:
        meta = chunk_meta[-1].metadata
        summary["generation_seconds"] = meta["generation_seconds"].value
        summary["engine_load_seconds"] = meta["engine_load_seconds"].value
        summary["completion_tokens_per_second"] = meta["completion_tokens_per_second"].value
    if output:
        import shutil

        output.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths.output, output / "output.jsonl")
        shutil.copyfile(paths.errors, output / "errors.jsonl")
        summary["output_file"] = str(output / "output.jsonl")
        summary["error_file"] = str(output / "errors.jsonl")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"batch {batch_id}: {summary['completed']} completed, {summary['failed']} failed "
               f"in {elapsed:.1f}s (engine load {summary.get('engine_load_seconds', 0):.1f}s, "
               f"{summary.get('completion_tokens_per_second', 0):.0f} generated tokens/s)")
    click.echo(f"output: {summary['output_file']}")
    click.echo(f"errors: {summary['error_file']}")


def _failure_message(result) -> str:
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            if data.user_failure_data and data.user_failure_data.description:
                return data.user_failure_data.description
            error = data.error
            while error is not None and error.cause is not None:
                error = error.cause
            if error is not None:
                return error.message.strip().splitlines()[-1]
    return "the run failed; see the Dagster UI for its logs"


@main.command("tiny-model")
@click.argument("target", type=click.Path(path_type=Path), default=Path("models/tiny-llama"))
def tiny_model(target: Path) -> None:
    """Build the tiny random-weight Llama used by the tests and the demo (no download needed)."""
    from batch_pipeline.tiny_model import build_tiny_model

    click.echo(str(build_tiny_model(target).resolve()))


if __name__ == "__main__":
    main()
