"""The Label Studio server as a Dagster resource: projects, paged task imports and reads, one-line errors."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from dagster import ConfigurableResource, InitResourceContext
from pydantic import PrivateAttr

# Label Studio keeps project titles to 50 characters.
_TITLE_LIMIT = 50
_READ_PAGE = 500


class CurationError(Exception):
    """Label Studio could not do what curation asked; the message is one readable line, never the token."""


def project_title(prefix: str, name: str) -> str:
    """`<prefix> <name>`, shortened with a hash suffix to fit Label Studio's 50-character limit."""
    title = f"{prefix} {name}"
    if len(title) <= _TITLE_LIMIT:
        return title
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{title[:_TITLE_LIMIT - 9]}~{digest}"


def data_filter(**equal: str) -> dict[str, Any]:
    """A Data Manager filter: every `data.<key>` equals the given string."""
    return {"conjunction": "and", "items": [
        {"filter": f"filter:tasks:data.{key}", "operator": "equal", "type": "String", "value": value}
        for key, value in equal.items()]}


def _annotated(filters: dict[str, Any]) -> dict[str, Any]:
    items = filters["items"] + [{"filter": "filter:tasks:total_annotations", "operator": "greater",
                                 "type": "Number", "value": 0}]
    return {"conjunction": "and", "items": items}


def _api_message(body: Any) -> str:
    """Label Studio's own words from an error body (validation errors first)."""
    if isinstance(body, dict):
        errors = body.get("validation_errors")
        if errors:
            if isinstance(errors, dict):
                return "; ".join(f"{field}: {' '.join(map(str, msgs)) if isinstance(msgs, list) else msgs}"
                                 for field, msgs in errors.items())
            return str(errors)
        return str(body.get("detail") or body)
    return str(body)


class LabelStudio(ConfigurableResource):
    """A Label Studio server reached with an API token (the legacy `Token` kind)."""

    url: str
    api_key: str
    page_size: int = 500
    timeout_seconds: float = 60.0

    _client: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._client = None  # built on first use, so a run that never calls Label Studio never connects

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        client, self._client = self._client, None
        httpx_client = getattr(getattr(client, "_client_wrapper", None), "httpx_client", None)
        inner = getattr(httpx_client, "httpx_client", None)
        if inner is not None:
            inner.close()

    @property
    def client(self) -> Any:
        """The label-studio-sdk client (created once per run)."""
        if self._client is None:
            from label_studio_sdk import LabelStudio as Client

            self._client = Client(base_url=self.url.rstrip("/"), api_key=self.api_key, timeout=self.timeout_seconds)
        return self._client

    @contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        """Turn SDK and network errors into a CurationError of one line."""
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        try:
            yield
        except ApiError as exc:
            if exc.status_code in (401, 403):
                raise CurationError(f"Label Studio at {self.url} refused the API token (HTTP {exc.status_code}) "
                                    f"while {what}; check VBATCH_LABEL_STUDIO_API_KEY") from None
            raise CurationError(f"Label Studio rejected {what} (HTTP {exc.status_code}): "
                                f"{_api_message(exc.body)}") from None
        except httpx.HTTPError as exc:
            raise CurationError(f"Label Studio at {self.url} is unreachable while {what}: "
                                f"{type(exc).__name__}: {exc}") from None

    def project_url(self, project_id: int) -> str:
        """The project's page in the Label Studio UI."""
        return f"{self.url.rstrip('/')}/projects/{project_id}/data"

    def find_project(self, title: str) -> int | None:
        """The id of the oldest project with exactly this title, if any (Label Studio's filter is a substring)."""
        with self._calling(f"listing projects titled {title!r}"):
            matches = [p.id for p in self.client.projects.list(title=title, page_size=100) if p.title == title]
        return min(matches) if matches else None

    def ensure_project(self, title: str, label_config: str, description: str = "") -> int:
        """The project with this title, created with the labeling config when missing."""
        found = self.find_project(title)
        if found is not None:
            return found
        with self._calling(f"creating project {title!r} with its labeling config"):
            return self.client.projects.create(title=title, label_config=label_config, description=description).id

    def _page(self, project_id: int, filters: dict[str, Any], page: int, page_size: int, fields: str) -> Any:
        query = json.dumps({"filters": filters})
        with self._calling(f"reading tasks of project {project_id}"):
            return self.client.tasks.list(project=project_id, query=query, page=page, page_size=page_size,
                                          fields=fields)

    def iter_tasks(self, project_id: int, filters: dict[str, Any], *, annotated: bool = False,
                   with_annotations: bool = False) -> Iterator[Any]:
        """Every task matching the filters, one page of the Data Manager API at a time."""
        if annotated:
            filters = _annotated(filters)
        fields = "all" if with_annotations else "task_only"
        page, seen = 1, 0
        while True:
            pager = self._page(project_id, filters, page, _READ_PAGE, fields)
            yield from pager.items
            seen += len(pager.items)
            # Label Studio answers 404 for a page past the end, so stop by the total instead of asking.
            if not pager.items or seen >= int(pager.response.total or 0):
                return
            page += 1

    def count(self, project_id: int, filters: dict[str, Any]) -> tuple[int, int]:
        """(tasks, annotations) matching the filters."""
        response = self._page(project_id, filters, 1, 1, "task_only").response
        return int(response.total or 0), int(response.total_annotations or 0)

    def latest_annotated(self, project_id: int, filters: dict[str, Any]) -> str | None:
        """When the most recently updated annotated task matching the filters changed (ISO time), if any."""
        query = json.dumps({"filters": _annotated(filters), "ordering": ["-tasks:updated_at"]})
        with self._calling(f"reading tasks of project {project_id}"):
            items = self.client.tasks.list(project=project_id, query=query, page=1, page_size=1).items
        return items[0].updated_at.isoformat() if items and items[0].updated_at else None

    def existing_values(self, project_id: int, filters: dict[str, Any], key: str) -> set[str]:
        """`data[key]` of every task matching the filters: what an import must not add again."""
        return {str(task.data.get(key)) for task in self.iter_tasks(project_id, filters)}

    def import_tasks(self, project_id: int, tasks: Sequence[dict[str, Any]]) -> int:
        """Import one page of tasks (data plus predictions) in one request; returns how many were created."""
        if not tasks:
            return 0
        with self._calling(f"importing {len(tasks)} tasks into project {project_id}"):
            response = self.client.projects.import_tasks(id=project_id, request=list(tasks))
        return int(response.task_count or 0)
