"""An integration whose asset always fails: the batch it follows must still succeed."""

from dagster import AssetExecutionContext, AutomationCondition, Definitions, Failure, asset

from assets import batch_results
from batch_pipeline.domain.batches import batches_partitions


@asset(partitions_def=batches_partitions, deps=[batch_results], automation_condition=AutomationCondition.eager())
def always_fails(context: AssetExecutionContext) -> None:
    """Fails, as a misconfigured destination would."""
    raise Failure(f"the destination for {context.partition_key} refused the upload")


def build_definitions(settings) -> Definitions:
    return Definitions(assets=[always_fails])
