"""The OpenAI-compatible Batch API: the shapes (schemas), the file store, the batch service and the HTTP app.

Only `app` needs FastAPI (the `api` extra); the CLI uses `service` and `schemas` without it.
"""
