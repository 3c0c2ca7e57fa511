"""An example integration: a digest of each finished batch (finish reasons, output checksum).

Not shipped with the package; it shows the seam that the built-in integrations use. Switch it on with
`VBATCH_INTEGRATIONS=examples.integrations.batch_digest.definitions` (run from the project folder).
"""

import hashlib
import json
from collections import Counter

from dagster import AssetExecutionContext, AutomationCondition, Definitions, MaterializeResult, MetadataValue, asset

from assets import batch_results
from batch_pipeline.domain.batches import batches_partitions
from batch_pipeline.domain.settings import Settings
from resources.storage import BatchStorage, atomic_path


@asset(
    partitions_def=batches_partitions,
    deps=[batch_results],
    automation_condition=AutomationCondition.eager(),
    group_name="batch_digest",
    kinds={"json"},
)
def batch_digest(context: AssetExecutionContext, storage: BatchStorage) -> MaterializeResult:
    """How the batch's responses finished, and the sha256 of its output file."""
    paths = storage.batch(context.partition_key)
    reasons: Counter[str] = Counter()
    digest = hashlib.sha256()
    with paths.output.open("rb") as handle:
        for line in handle:
            digest.update(line)
            for choice in json.loads(line)["response"]["body"].get("choices", []):
                reasons[choice.get("finish_reason") or "none"] += 1
    result = {"finish_reasons": dict(reasons), "output_sha256": digest.hexdigest()}
    target = paths.results_dir / "digest.json"
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    return MaterializeResult(metadata={"output_sha256": result["output_sha256"],
                                       "finish_reasons": MetadataValue.json(result["finish_reasons"]),
                                       "digest_file": MetadataValue.path(str(target))})


def build_definitions(settings: Settings) -> Definitions:
    """The integration's definitions; the core provides the `storage` resource."""
    return Definitions(assets=[batch_digest])
