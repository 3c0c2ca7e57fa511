"""Put this folder first on PYTHONPATH to make the integrations' packages unimportable (tests of the lean core).

prometheus-client (and fastapi) are not blocked: vLLM itself depends on them; the import-linter contract in
pyproject.toml checks that the core never imports it.
"""

import importlib.abc
import sys

BLOCKED = {"label_studio_sdk", "boto3", "botocore", "standardwebhooks", "google.cloud.storage"}


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or any(name.startswith(blocked + ".") for blocked in BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by tests/data/core_only)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
