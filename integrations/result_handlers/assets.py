"""One asset per enabled result handler, downstream of batch_results on the `batches` partitions."""

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    AutomationCondition,
    Backoff,
    Failure,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    asset,
)

from assets import batch_results
from batch_pipeline.domain.batches import BatchRecordError, batches_partitions
from integrations.result_handlers.base import DeliveryRefused, FinishedBatch, ResultHandler
from resources.storage import BatchStorage

# Transient errors (a store restarting, a network blip) are retried inside the run; after that the asset
# fails on its own, visible in the UI, and the batch's results are untouched.
HANDLER_RETRIES = RetryPolicy(max_retries=3, delay=5, backoff=Backoff.EXPONENTIAL)


def resource_key(handler: type[ResultHandler]) -> str:
    """The resource key a handler is bound to."""
    return f"result_handler_{handler.short_name()}"


def build_handler_asset(handler: type[ResultHandler]) -> AssetsDefinition:
    """The `deliver_<name>` asset: deliver one finished batch with the handler, record what went where."""
    key = resource_key(handler)

    @asset(
        name=f"deliver_{handler.short_name()}",
        partitions_def=batches_partitions,
        deps=[batch_results],
        automation_condition=AutomationCondition.eager(),
        retry_policy=HANDLER_RETRIES,
        required_resource_keys={key, "storage"},
        group_name="result_handlers",
        kinds={handler.short_name()},
        description=f"Deliver the batch's result files with {handler.__name__}.",
    )
    def deliver(context: AssetExecutionContext) -> MaterializeResult:
        storage: BatchStorage = context.resources.storage
        paths = storage.batch(context.partition_key)
        try:
            batch = FinishedBatch.from_paths(paths)
        except BatchRecordError as exc:  # a retry would read the same file
            raise Failure(str(exc), allow_retries=False) from None
        try:
            delivered = getattr(context.resources, key).deliver(batch, context.log)
        except DeliveryRefused as exc:
            raise Failure(f"{handler.__name__}: {exc}", allow_retries=False) from exc
        moved = [item for item in delivered if item.transferred]
        context.log.info(f"{len(moved)} of {len(delivered)} files transferred "
                         f"({sum(item.bytes for item in moved)} bytes); the rest were already there")
        metadata: dict = {
            "files": MetadataValue.json([item.as_dict() for item in delivered]),
            "transferred_files": len(moved),
            "transferred_bytes": sum(item.bytes for item in moved),
        }
        for item in delivered:
            metadata[item.name] = MetadataValue.url(item.uri) if "://" in item.uri else item.uri
            metadata[f"{item.name} sha256"] = item.sha256
        return MaterializeResult(metadata=metadata)

    return deliver
