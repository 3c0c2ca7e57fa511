"""Dagster assets, one module per stage: batch_input -> batch_chunks -> batch_results."""

from assets.batch_chunks import batch_chunks
from assets.batch_input import batch_input
from assets.batch_results import batch_results

__all__ = ["batch_chunks", "batch_input", "batch_results"]
