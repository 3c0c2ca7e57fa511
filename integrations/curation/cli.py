"""`vllm-batch curation status|export BATCH_ID`: a batch's review status and its training file, from the files
the curation assets write (no Label Studio call)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click


def _batch_paths(batch_id: str):
    from batch_pipeline.domain.batches import BatchNotFound, existing_batch
    from batch_pipeline.domain.settings import get_settings
    from resources.storage import location

    try:
        return existing_batch(location(get_settings().data_root), batch_id)
    except BatchNotFound:
        raise click.ClickException(f"no batch with id {batch_id!r}") from None


@click.group()
def curation() -> None:
    """Curation in Label Studio: a batch's review status and its training file."""


@curation.command()
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON (the API's body).")
def status(batch_id: str, as_json: bool) -> None:
    """Tasks imported and annotated, accepted, rejected, corrected, and the rates."""
    from integrations.curation.status import read_status

    current = read_status(_batch_paths(batch_id))
    if current is None:
        raise click.ClickException(f"curation has not run for batch {batch_id} yet")
    if as_json:
        click.echo(current.model_dump_json(indent=2))
        return
    rate = "-" if current.accept_rate is None else f"{current.accept_rate:.0%}"
    click.echo(f"{batch_id}  {current.tasks_imported}/{current.tasks_selected} tasks imported, "
               f"{current.tasks_annotated} annotated: {current.accepted} accepted, {current.rejected} rejected, "
               f"{current.corrected} corrected (accept rate {rate}); {current.training_examples} training examples")
    if current.project_url:
        click.echo(f"project: {current.project_url}")
    for win in current.win_rates:
        share = "-" if win.win_rate_a is None else f"{win.win_rate_a:.0%}"
        click.echo(f"pairwise {win.batch_a} vs {win.batch_b}: {win.wins_a}-{win.wins_b} of {win.compared} ({share})")


@curation.command()
@click.argument("batch_id")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write training.jsonl here instead of stdout.")
def export(batch_id: str, output: Path | None) -> None:
    """Print (or save) the batch's training.jsonl: its accepted and corrected answers for fine-tuning."""
    from integrations.curation.status import training_file

    path = training_file(_batch_paths(batch_id))
    if path is None:
        raise click.ClickException(f"batch {batch_id} has no training file yet (curation_annotations has not run)")
    if output is None:
        with path.open("rb") as handle:
            shutil.copyfileobj(handle, sys.stdout.buffer)
        return
    try:
        shutil.copyfile(path, output)
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from None
    click.echo(str(output))
