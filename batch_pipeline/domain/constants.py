"""Names and status sets used across the pipeline, defined once: run tags and Dagster run statuses."""

from __future__ import annotations

from dagster import DagsterRunStatus

# The dynamic partitions definition: one partition per batch, keyed by batch id.
BATCHES_PARTITIONS = "batches"

# Tags on every run of batch_job (Dagster's own, and this project's).
PARTITION_TAG = "dagster/partition"
RUN_KEY_TAG = "dagster/run_key"
WILL_RETRY_TAG = "dagster/will_retry"
BATCH_ID_TAG = "vllm_batch/batch_id"
SOURCE_TAG = "vllm_batch/source"  # api, cli, inbox, schedule
OWNER_TAG = "vllm_batch/owner"  # the fingerprint of the API key that created the batch (never the key)
INBOX_FILE_TAG = "vllm_batch/inbox_file"
REJECTED_TAG = "vllm_batch/rejected"
# Which process runs an in-process run (`vllm-batch run`), so a dead one can be told from a live one.
HOST_TAG = "vllm_batch/host"
LOCAL_PID_TAG = "vllm_batch/local_pid"
LOCAL_PID_STARTED_TAG = "vllm_batch/local_pid_started"

# A run in one of these may still do work (or is about to): the batch is not settled.
ACTIVE_RUN_STATUSES = frozenset({
    DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING, DagsterRunStatus.MANAGED,
})

# A batch_input failure carries its error code (the failed batch's `errors.data[].code`) in this metadata key.
FAILURE_CODE_KEY = "error_code"
# The code of a batch whose every line was rejected: its errors list the lines (OpenAI's shape).
NO_VALID_REQUESTS = "no_valid_requests"
# At most this many line errors are listed in a failed batch's `errors` (the file has them all).
MAX_BATCH_ERRORS = 1000
