"""The curation assets of a batch: review tasks in Label Studio, pairwise comparisons, annotations back as data."""

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import chain, islice
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    AutomationCondition,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
)

from assets import batch_results
from batch_pipeline.domain.batches import batches_partitions, load_spec
from batch_pipeline.domain.settings import Settings
from integrations.curation.annotations import Quality, annotation_record, final_annotation, training_example, win_rates
from integrations.curation.compare import pair_key, pairwise_tasks
from integrations.curation.label_config import ANSWER, PAIRWISE_CONFIG, PROMPT, REVIEW_CONFIG
from integrations.curation.paths import CurationPaths
from integrations.curation.records import ANNOTATIONS_SCHEMA, PairwiseTaskData, ReviewTaskData
from integrations.curation.resources import CurationError, LabelStudio, data_filter, project_title
from integrations.curation.selection import Selection, select_for_review
from integrations.curation.status import read_status, update_status
from resources.storage import BatchStorage, atomic_path

REVIEW_PREFIX = "vllm-batch review:"
PAIRWISE_TITLE = "vllm-batch pairwise comparisons"
COMPARE_METADATA_KEY = "curation_compare_with"  # batch metadata naming the batch to compare with
_ROWS_PER_WRITE = 1000

T = TypeVar("T")


def _pages(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while page := list(islice(iterator, size)):
        yield page


@contextmanager
def _label_studio_failures() -> Iterator[None]:
    # One line in the UI and in `vllm-batch run`, e.g. "Label Studio at ... refused the API token".
    try:
        yield
    except CurationError as exc:
        raise Failure(description=str(exc)) from None


def review_task(task: ReviewTaskData) -> dict[str, Any]:
    """The import record of a review task: its data and the model's answer as a prediction."""
    return {"data": task.model_dump(mode="json"),
            "predictions": [{"model_version": f"{task.batch_id}:{task.model}",
                             "result": [{"from_name": ANSWER, "to_name": PROMPT, "type": "textarea",
                                         "value": {"text": [task.response]}}]}]}


def review_project_title(settings: Settings, batch_id: str, model_name: str) -> str:
    """The review project of a batch: one per model (default) or one per batch."""
    return project_title(REVIEW_PREFIX, batch_id if settings.curation_project_per == "batch" else model_name)


def build_assets(settings: Settings) -> list[AssetsDefinition]:
    """The curation assets, with the selection and page size taken from the settings."""
    selection = Selection.from_settings(settings)
    page_size = settings.curation_page_size

    @asset(partitions_def=batches_partitions, deps=[batch_results], automation_condition=AutomationCondition.eager(),
           group_name="curation", kinds={"labelstudio"})
    def curation_tasks(context: AssetExecutionContext, storage: BatchStorage,
                       label_studio: LabelStudio) -> MaterializeResult:
        """One Label Studio review task per selected successful request, the answer as a prediction; never twice."""
        batch_id = context.partition_key
        paths = storage.batch(batch_id)
        spec = load_spec(paths)
        title = review_project_title(settings, batch_id, spec.model_name)
        with _label_studio_failures():
            project_id = label_studio.ensure_project(title, REVIEW_CONFIG, "Review of vllm-batch outputs")
            # Label Studio is the ledger: what is there for this batch is not imported again, so a re-run or a
            # run after an interrupted import adds exactly the missing tasks (each page is one transaction).
            present = label_studio.existing_values(project_id, data_filter(kind="review", batch_id=batch_id),
                                                   "custom_id")
            selected = imported = 0
            for page in _pages(select_for_review(paths, batch_id, spec.model_name, selection), page_size):
                selected += len(page)
                new = [review_task(task) for task in page if task.custom_id not in present]
                imported += label_studio.import_tasks(project_id, new)
                if new:
                    context.log.info(f"imported {imported} tasks so far ({selected} selected)")
        total = len(present) + imported
        update_status(paths, project_id=project_id, project_url=label_studio.project_url(project_id),
                      tasks_selected=selected, tasks_imported=total, tasks_updated_at=time.time())
        context.log.info(f"{imported} new review tasks in project {project_id} ({total} for this batch)")
        return MaterializeResult(metadata={
            "project_id": project_id, "project": MetadataValue.url(label_studio.project_url(project_id)),
            "selection": selection.describe(), "tasks_selected": selected, "tasks_imported": imported,
            "tasks_already_present": len(present), "tasks_total": total})

    class CompareConfig(Config):
        compare_with: str | None = None  # default: the batch's `curation_compare_with` metadata

    @asset(partitions_def=batches_partitions, deps=[batch_results], automation_condition=AutomationCondition.eager(),
           group_name="curation", kinds={"labelstudio"}, output_required=False)
    def curation_compare(context: AssetExecutionContext, config: CompareConfig, storage: BatchStorage,
                         label_studio: LabelStudio) -> Iterator[Output[None]]:
        """Pairwise tasks (which answer is better?) for the custom_ids this batch shares with another batch."""
        batch_id = context.partition_key
        paths = storage.batch(batch_id)
        spec = load_spec(paths)
        other_id = config.compare_with or spec.metadata.get(COMPARE_METADATA_KEY)
        if not other_id:
            context.log.info(f"no batch to compare with (set the batch's {COMPARE_METADATA_KEY} metadata)")
            return
        if other_id == batch_id:
            raise Failure(description="a batch cannot be compared with itself")
        other_paths = storage.batch(other_id)
        if not other_paths.results_parquet.is_file():
            raise Failure(description=f"batch {other_id} has no results to compare with")
        other_spec = load_spec(other_paths)
        pair = pair_key(batch_id, other_id)
        with _label_studio_failures():
            project_id = label_studio.ensure_project(PAIRWISE_TITLE, PAIRWISE_CONFIG, "Which answer is better?")
            present = label_studio.existing_values(project_id, data_filter(kind="pairwise", pair=pair), "custom_id")
            shared = imported = 0
            tasks = pairwise_tasks((paths, batch_id, spec.model_name), (other_paths, other_id, other_spec.model_name),
                                   selection)
            for page in _pages(tasks, page_size):
                shared += len(page)
                imported += label_studio.import_tasks(
                    project_id, [pairwise_record(t) for t in page if t.custom_id not in present])
        context.log.info(f"{imported} new pairwise tasks for {pair} in project {project_id}")
        yield Output(None, metadata={
            "pair": pair, "project_id": project_id, "project": MetadataValue.url(label_studio.project_url(project_id)),
            "pairs_selected": shared, "tasks_imported": imported, "tasks_already_present": len(present)})

    @asset(partitions_def=batches_partitions, deps=[curation_tasks], group_name="curation", kinds={"labelstudio", "parquet"})
    def curation_annotations(context: AssetExecutionContext, storage: BatchStorage,
                             label_studio: LabelStudio) -> MaterializeResult:
        """The batch's reviews: annotations.parquet, training.jsonl (accepted or corrected answers), quality scores."""
        batch_id = context.partition_key
        paths = storage.batch(batch_id)
        status = read_status(paths)
        if status is None or status.project_id is None:
            raise Failure(description=f"no review tasks for batch {batch_id} yet: materialise curation_tasks first")
        files = CurationPaths(paths)
        quality = Quality()
        rows = 0
        with _label_studio_failures():
            tasks = label_studio.iter_tasks(status.project_id, data_filter(kind="review", batch_id=batch_id),
                                            annotated=True, with_annotations=True)
            with atomic_path(files.annotations) as parquet_tmp, atomic_path(files.training) as training_tmp:
                with pq.ParquetWriter(parquet_tmp, ANNOTATIONS_SCHEMA) as parquet, training_tmp.open("w") as training:
                    for page in _pages(tasks, _ROWS_PER_WRITE):
                        records = []
                        for task in page:
                            task_records = [annotation_record(task, a) for a in task.annotations or []]
                            records += task_records
                            final = final_annotation(task_records)
                            if final is None:
                                continue
                            example = training_example(task, final)
                            quality.add(final, example)
                            if example is not None:
                                training.write(example.model_dump_json() + "\n")
                        rows += len(records)
                        parquet.write_table(pa.Table.from_pylist([r.model_dump() for r in records],
                                                                 schema=ANNOTATIONS_SCHEMA))
            rates = []
            pairwise_project = label_studio.find_project(PAIRWISE_TITLE)
            if pairwise_project is not None:
                # This batch's pairwise tasks: those with it on the left, then those with it on the right.
                rates = win_rates(chain.from_iterable(
                    label_studio.iter_tasks(pairwise_project, data_filter(kind="pairwise", **{side: batch_id}),
                                            annotated=True, with_annotations=True)
                    for side in ("batch_left", "batch_right")))
        status = update_status(
            paths, tasks_annotated=quality.annotated, accepted=quality.accepted, rejected=quality.rejected,
            corrected=quality.corrected, accept_rate=quality.rate(quality.accepted), mean_rating=quality.mean_rating,
            correction_rate=quality.rate(quality.corrected), training_examples=quality.training_examples,
            win_rates=[r.model_dump() for r in rates], annotations_updated_at=time.time())
        metadata: dict[str, Any] = {
            "tasks_imported": status.tasks_imported, "tasks_annotated": quality.annotated, "annotations": rows,
            "accepted": quality.accepted, "rejected": quality.rejected, "corrected": quality.corrected,
            "training_examples": quality.training_examples,
            "annotations_file": MetadataValue.path(str(files.annotations)),
            "training_file": MetadataValue.path(str(files.training)),
        }
        # Numbers only when defined: Dagster plots numeric metadata batch after batch.
        for key, value in (("accept_rate", quality.rate(quality.accepted)), ("mean_rating", quality.mean_rating),
                           ("correction_rate", quality.rate(quality.corrected))):
            if value is not None:
                metadata[key] = value
        for rate in rates:
            other = rate.batch_b if rate.batch_a == batch_id else rate.batch_a
            mine = rate.win_rate_a if rate.batch_a == batch_id else (None if rate.win_rate_a is None else 1 - rate.win_rate_a)
            if mine is not None:
                metadata[f"win_rate_vs_{other}"] = round(mine, 4)
        if rates:
            metadata["win_rates"] = MetadataValue.json([r.model_dump() for r in rates])
        context.log.info(f"{quality.annotated} reviewed tasks, {quality.training_examples} training examples")
        return MaterializeResult(metadata=metadata)

    return [curation_tasks, curation_compare, curation_annotations]


def pairwise_record(task: PairwiseTaskData) -> dict[str, Any]:
    """The import record of a pairwise task (no prediction: reviewers pick without a default)."""
    return {"data": task.model_dump(mode="json")}
