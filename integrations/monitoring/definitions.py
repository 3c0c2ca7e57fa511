"""The monitoring integration's Dagster definitions: one asset whose numeric metadata the UI plots per batch.

The Prometheus endpoint itself is not a Dagster object: it is served by `vllm-batch start`
(integrations/monitoring/exporter.py). This module imports no prometheus_client, so the code
server and run workers stay as they are.
"""

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    AutomationCondition,
    Definitions,
    MaterializeResult,
    asset,
)

from assets import batch_results
from batch_pipeline.domain.batches import batches_partitions
from batch_pipeline.domain.settings import Settings

STEP_METADATA = ("generation_seconds", "engine_load_seconds", "step_seconds", "completion_tokens_per_second",
                 "chunks_run", "chunks_resumed")
RESULT_METADATA = ("total", "completed", "failed", "prompt_tokens", "completion_tokens")


def _latest_metadata(context: AssetExecutionContext, asset: str) -> dict[str, float]:
    """The numeric metadata of `asset`'s newest materialization of this batch's partition."""
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[context.partition_key]), limit=1).records
    if not records or records[0].asset_materialization is None:
        return {}
    metadata = records[0].asset_materialization.metadata
    return {key: value.value for key, value in metadata.items()
            if isinstance(value.value, int | float) and not isinstance(value.value, bool)}


@asset(
    partitions_def=batches_partitions,
    deps=[batch_results],
    automation_condition=AutomationCondition.eager(),
    group_name="monitoring",
    kinds={"prometheus"},
)
def batch_run_stats(context: AssetExecutionContext) -> MaterializeResult:
    """A batch's figures in one place (tokens/s, requests, failures, duration, engine load), plotted batch after batch."""
    chunks = _latest_metadata(context, "batch_chunks")
    results = _latest_metadata(context, "batch_results")
    stats = {key: chunks[key] for key in STEP_METADATA if key in chunks}
    stats.update({f"requests_{key}" if key in ("total", "completed", "failed") else key: results[key]
                  for key in RESULT_METADATA if key in results})
    if stats.get("requests_total"):
        stats["failure_ratio"] = round(stats.get("requests_failed", 0) / stats["requests_total"], 4)
    return MaterializeResult(metadata=stats)


def build_definitions(settings: Settings) -> Definitions:
    """The integration's definitions; the metrics endpoint is started by `vllm-batch start`, not here."""
    return Definitions(assets=[batch_run_stats])


def start_service(settings: Settings, echo=print):
    """What `vllm-batch start` runs beside the webserver and daemon: the metrics endpoint (or None)."""
    from integrations.monitoring.exporter import start_exporter

    return start_exporter(settings, echo)
