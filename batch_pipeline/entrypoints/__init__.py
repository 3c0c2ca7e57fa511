"""Entry points: the `vllm-batch` CLI, the Batch API server, the service supervisor and the console."""
