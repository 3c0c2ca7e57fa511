"""One batch run in the test's own process (on the session's engine: the `loaded_engine` fixture)."""

from __future__ import annotations

from pathlib import Path

from tests.support.files import read_jsonl, write_jsonl
from tests.support.request_lines import MODEL_NAME


def run_batch(settings, instance, tiny_model: Path, lines: list, batch_id: str = "b1"):
    """Register `lines` as batch `batch_id` and run it; returns the run's result, its output and error records."""
    from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process

    path = write_jsonl(settings.resolved_data_dir.parent / f"{batch_id}.jsonl", lines)
    spec = register_local_batch(settings, instance, path, str(tiny_model), MODEL_NAME, batch_id=batch_id)
    result = run_batch_in_process(settings, instance, spec.batch_id)
    assert result.success, result.error
    return result, read_jsonl(result.paths.output), read_jsonl(result.paths.errors)


def by_id(records: list[dict]) -> dict[str, dict]:
    """Output or error records by custom_id."""
    return {r["custom_id"]: r for r in records}
