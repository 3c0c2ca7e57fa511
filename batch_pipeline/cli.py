"""`vllm-batch`: run batches from the command line.

Every command exits non-zero with a one-line message on failure; `--json` prints machine-readable output.
"""

from __future__ import annotations

import json
import os
import sys
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
    from batch_pipeline.instance import InstanceConfigError, open_instance
    from batch_pipeline.local_run import BatchRunError, register_local_batch, run_batch_in_process

    try:
        instance = open_instance(settings)
        spec = register_local_batch(settings, instance, input_file, model, model_name, batch_id, chunk_size)
    except (InstanceConfigError, BatchRunError) as exc:
        _fail(str(exc))
    result = run_batch_in_process(settings, instance, spec.batch_id)
    if not result.success:
        _fail(f"batch {spec.batch_id} failed: {result.error}")
    summary = dict(result.summary, run_id=result.run_id, seconds=round(result.seconds, 2))
    if output:
        import shutil

        output.mkdir(parents=True, exist_ok=True)
        for name, source in (("output.jsonl", result.paths.output), ("errors.jsonl", result.paths.errors)):
            shutil.copyfile(source, output / name)
        summary["output_file"] = str(output / "output.jsonl")
        summary["error_file"] = str(output / "errors.jsonl")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"batch {spec.batch_id}: {summary['completed']} completed, {summary['failed']} failed "
               f"in {result.seconds:.1f}s (engine load {summary.get('engine_load_seconds', 0):.1f}s, "
               f"{summary.get('completion_tokens_per_second', 0):.0f} generated tokens/s)")
    click.echo(f"output: {summary['output_file']}")
    click.echo(f"errors: {summary['error_file']}")


@main.command("tiny-model")
@click.argument("target", type=click.Path(path_type=Path), default=Path("models/tiny-llama"))
def tiny_model(target: Path) -> None:
    """Build the tiny random-weight Llama used by the tests and the demo (no download needed)."""
    from batch_pipeline.tiny_model import build_tiny_model

    click.echo(str(build_tiny_model(target).resolve()))


if __name__ == "__main__":
    main()
