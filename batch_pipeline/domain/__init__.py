"""The domain: batch files and records, intake, chunks, generation, results, status; no Dagster definitions."""
