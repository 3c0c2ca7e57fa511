"""The OpenAI-compatible Batch API over HTTP (FastAPI): files, batches and models.

Point the official `openai` client at it by changing `base_url` and `api_key` only. Every route
under /v1 needs a bearer key from the settings; every error has OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`. Each key is a tenant (batch_pipeline/domain/tenancy.py):
it sees only the files and batches it created, on every route, integration routes included.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from batch_pipeline.domain.batches import BatchNotFound
from batch_pipeline.domain.settings import Settings, get_settings
from batch_pipeline.domain.tenancy import Tenant, key_fingerprint
from batch_pipeline.entrypoints.api.files import FileNotFound
from batch_pipeline.entrypoints.api.schemas import (
    TERMINAL_STATUSES,
    Batch,
    CreateBatchRequest,
    ErrorBody,
    ExpiresAfter,
    FileDeleted,
    FileObject,
    ListPage,
    Model,
    expires_seconds,
)
from batch_pipeline.entrypoints.api.service import BatchRequestError, BatchService
from batch_pipeline.entrypoints.api.uploads import UploadError, UploadTooLarge, read_form
from batch_pipeline.orchestration.enabled_integrations import integration_middleware, integration_routers
from resources.storage import read_blocks

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
WINDOW_CHECK_INTERVAL_S = 10.0
STALE_UPLOAD_S = 3600.0  # an upload untouched this long was left by a server that stopped mid-upload
# On PostgreSQL, Dagster's storages open a new connection (and the server a new backend process) for
# every query unless told that the process is long-lived, as its webserver does. The API server is:
# one connection stays open, up to DB_POOL_MAX_OVERFLOW more while requests overlap.
DB_STATEMENT_TIMEOUT_MS = 60_000
DB_POOL_RECYCLE_S = 3600
DB_POOL_MAX_OVERFLOW = 40  # Starlette's thread pool: at most this many routes query at once
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in ((400, "Bad request"), (401, "Missing or invalid API key"), (404, "Unknown id"),
                         (422, "Invalid parameters"), (503, "The instance's database is not answering"))
}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON response in OpenAI's error shape."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BearerAuth:
    """Answers 401 to any request outside PUBLIC_PATHS without one of the configured keys, and tells the
    routes which tenant a valid key is (`request.state.tenant`).

    A pure ASGI middleware, so it runs before routing (unknown paths answer 401 too) and before an
    upload's body is read. Keys live only here, as their sha256 digests; the tenant carries the key's
    fingerprint.
    """

    def __init__(self, app: ASGIApp, keys: frozenset[str], admin_keys: frozenset[str] = frozenset()):
        self.app = app
        # A key listed as both is an admin key. Fingerprints are computed once, not per request.
        tenants = {key: Tenant(key_fingerprint(key)) for key in keys}
        tenants.update({key: Tenant(key_fingerprint(key), admin=True) for key in admin_keys})
        # Digests, so that every comparison is of 32 bytes and the time does not depend on a key's length.
        self.keys = [(hashlib.sha256(key.encode()).digest(), tenant) for key, tenant in tenants.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        # Compare against every key, without stopping at a match, so that the time taken tells nothing
        # about which key matched or nearly matched.
        digest = hashlib.sha256(token).digest()
        matched: Tenant | None = None
        for key, tenant in self.keys:
            if hmac.compare_digest(digest, key):
                matched = tenant
        if scheme.lower() != b"bearer" or not token or matched is None:
            message = ("No API keys are configured on this server (set VBATCH_API_KEYS)." if not self.keys
                       else "Incorrect or missing API key; send it as 'Authorization: Bearer <key>'.")
            await error_response(401, message, code="invalid_api_key")(scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = matched
        await self.app(scope, receive, send)


def tenant_of(request: Request) -> Tenant:
    """The tenant BearerAuth found for this request (a request without one sees nothing)."""
    tenant = getattr(request.state, "tenant", None)
    return tenant if isinstance(tenant, Tenant) else Tenant(owner=None)


def _attachment(filename: str) -> str:
    """The Content-Disposition of a download, as Starlette's FileResponse writes it."""
    quoted = quote(filename)
    return f"attachment; filename*=utf-8''{quoted}" if quoted != filename else f'attachment; filename="{filename}"'


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI app for `settings` (default: the process settings)."""
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from batch_pipeline.domain.instance import open_instance

        instance = open_instance(settings)
        instance.optimize_for_webserver(DB_STATEMENT_TIMEOUT_MS, DB_POOL_RECYCLE_S, DB_POOL_MAX_OVERFLOW)
        app.state.service = BatchService(settings, instance)
        app.state.service.files.remove_stale_uploads(STALE_UPLOAD_S)
        task = asyncio.create_task(_enforce_windows(app.state.service))
        try:
            yield
        finally:
            task.cancel()
            instance.dispose()

    def visible_ids(request: Request) -> None:
        # On every route, integrations' included: a `batch_id` or `file_id` in the path that the key's
        # tenant does not see answers the same 404 as an unknown id, before the route runs.
        tenant, params = tenant_of(request), request.path_params
        if "batch_id" in params:
            request.app.state.service.check_visible(params["batch_id"], tenant)
        if "file_id" in params:
            request.app.state.service.files.get(params["file_id"], tenant)

    app = FastAPI(title="vllm-batch", version="1", lifespan=lifespan, responses=_ERROR_RESPONSES,
                  dependencies=[Depends(visible_ids)],
                  description="OpenAI-compatible Batch API: files, batches and models, run by vLLM through Dagster.")
    app.add_middleware(BearerAuth, keys=settings.api_key_set(), admin_keys=settings.admin_key_set())
    for middleware in integration_middleware(settings):  # added later, so they run before the key check
        app.add_middleware(middleware, settings=settings)
    _add_error_handlers(app)
    _add_database_handlers(app, settings)

    def service(request: Request) -> BatchService:
        return request.app.state.service

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    # ---- files ---------------------------------------------------------------------------------

    @app.post("/v1/files", response_model=FileObject, responses={413: {"model": ErrorBody,
                                                                       "description": "File too large"}},
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["file", "purpose"],
                  "properties": {"file": {"type": "string", "format": "binary"},
                                 "purpose": {"type": "string", "enum": ["batch"]},
                                 "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                                 "expires_after[seconds]": {"type": "integer", "minimum": 3600,
                                                            "maximum": 2592000}}}}}}})
    async def upload_file(request: Request) -> FileObject | JSONResponse:
        """Upload a batch input file (multipart: `file`, `purpose=batch`, optional `expires_after[anchor]` and
        `expires_after[seconds]` as the openai client sends them), streamed to disk; its size, line lengths
        and JSONL shape are checked while it streams."""
        limit = settings.max_upload_bytes
        # A refusal before the body is read closes the connection: otherwise the server would go on
        # reading (and dropping) the rest of a body of any size, to keep the connection alive.
        closing = {"Connection": "close"}
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
            return error_response(413, f"the file is larger than the limit of {limit} bytes", "file",
                                  "file_too_large", headers=closing)
        store = service(request).files
        target = store.upload_path()
        try:
            form = await read_form(request.headers.get("content-type", ""), request.stream(), target, limit,
                                   settings.max_line_bytes)
            if form.file_field != "file" or form.filename is None:
                raise BatchRequestError("the form needs a 'file' part with a filename", "file")
            purpose = form.fields.get("purpose")
            if purpose != "batch":
                raise BatchRequestError(f"purpose must be 'batch', got {purpose!r}", "purpose")
            expires_after = _form_expires_after(form.fields)
            return await run_in_threadpool(store.adopt, target, form.filename, purpose, tenant_of(request).owner,
                                           expires_after)
        except UploadTooLarge as exc:
            return error_response(413, str(exc), "file", "file_too_large", headers=closing)
        except UploadError as exc:
            return error_response(400, str(exc), "file", exc.code, headers=closing)
        finally:
            target.unlink(missing_ok=True)

    @app.get("/v1/files", response_model=ListPage[FileObject])
    def list_files(request: Request, purpose: Annotated[str | None, Query(max_length=64)] = None,
                   limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
                   order: Literal["asc", "desc"] = "desc",
                   after: Annotated[str | None, Query(max_length=128)] = None) -> Response:
        """The key's files by `created_at`, newest first (`order=asc`: oldest first), OpenAI's cursor paging:
        `after` is the last id of the previous page."""
        try:
            files, more = service(request).files.page(limit, after, order == "desc", purpose, tenant_of(request))
        except FileNotFound:
            raise BatchRequestError(f"no file with id {after!r}", "after", "file_not_found") from None
        page = ListPage[FileObject](data=files, first_id=files[0].id if files else None,
                                    last_id=files[-1].id if files else None, has_more=more)
        # Encoded once by pydantic: FastAPI would validate the page again and encode it in Python (10,000
        # files a page by default).
        return Response(page.model_dump_json(), media_type="application/json")

    @app.get("/v1/files/{file_id}", response_model=FileObject)
    def get_file(request: Request, file_id: str) -> FileObject:
        """One file's record."""
        return service(request).files.get(file_id, tenant_of(request)).file

    @app.get("/v1/files/{file_id}/content", response_class=FileResponse,
             responses={200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes"}})
    def file_content(request: Request, file_id: str) -> Response:
        """The bytes of a file (an uploaded input, or a batch's output or error file)."""
        store, tenant = service(request).files, tenant_of(request)
        path, file = store.content(file_id, tenant), store.get(file_id, tenant).file
        if isinstance(path, Path):
            return FileResponse(path, media_type="application/octet-stream", filename=file.filename)
        # A batch's results on an object-store data root: streamed from the store.
        return StreamingResponse(read_blocks(path), media_type="application/octet-stream",
                                 headers={"content-disposition": _attachment(file.filename)})

    @app.delete("/v1/files/{file_id}", response_model=FileDeleted)
    def delete_file(request: Request, file_id: str) -> FileDeleted:
        """Delete an uploaded file (a batch's output file: only its record)."""
        service(request).files.delete(file_id, tenant_of(request))
        return FileDeleted(id=file_id, deleted=True)

    # ---- batches -------------------------------------------------------------------------------

    @app.post("/v1/batches", response_model=Batch)
    def create_batch(request: Request, body: CreateBatchRequest) -> Batch:
        """Create a batch from an uploaded file; the daemon launches it through the run queue."""
        return service(request).create(body.input_file_id, body.endpoint, body.completion_window, body.metadata,
                                       tenant_of(request), body.output_expires_after)

    @app.get("/v1/batches", response_model=ListPage[Batch])
    def list_batches(request: Request, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                     after: Annotated[str | None, Query(max_length=128)] = None) -> ListPage[Batch]:
        """The key's batches, newest first; `after` is the last id of the previous page."""
        return service(request).list(limit, after, tenant_of(request))

    @app.get("/v1/batches/{batch_id}", response_model=Batch)
    def get_batch(request: Request, batch_id: str) -> Batch:
        """One batch, with its status and counts as of now."""
        return service(request).describe(batch_id, tenant_of(request))

    @app.get("/v1/batches/{batch_id}/output", response_class=StreamingResponse,
             responses={200: {"content": {"application/jsonl": {}},
                              "description": "Output lines so far, in input order"}})
    def batch_output(request: Request, batch_id: str, partial: bool = False) -> StreamingResponse:
        """The batch's output lines (beyond OpenAI). `partial=true` while it runs: the lines of its chunks
        finished without a gap from the first, a prefix of the final output file byte for byte."""
        batch = service(request).describe(batch_id, tenant_of(request))
        if not partial and batch.status not in TERMINAL_STATUSES:
            raise BatchRequestError(f"batch {batch_id} is {batch.status}; ask with partial=true for the lines "
                                    "finished so far", "partial", "batch_not_finished")
        lines = service(request).partial_output(batch_id, tenant_of(request))
        return StreamingResponse(lines, media_type="application/jsonl")

    @app.get("/v1/batches/{batch_id}/replay_record")
    def batch_replay_record(request: Request, batch_id: str) -> dict[str, Any]:
        """What it takes to run a finished batch again the same way (beyond OpenAI): input sha256, model
        fingerprint, engine settings and seed, chunk size, versions, machine. 400 `batch_not_finished`
        before the batch has finished."""
        return service(request).replay_record(batch_id, tenant_of(request))

    @app.post("/v1/batches/{batch_id}/cancel", response_model=Batch)
    def cancel_batch(request: Request, batch_id: str) -> Batch:
        """Cancel a batch; requests finished before the cancel stay in its output file."""
        return service(request).cancel(batch_id, tenant_of(request))

    # ---- models --------------------------------------------------------------------------------

    @app.get("/v1/models", response_model=ListPage[Model])
    def list_models(request: Request) -> ListPage[Model]:
        """The served models from the models file."""
        registry = service(request).registry()
        data = [Model(id=name, created=int(time.time())) for name in sorted(registry.models)]
        return ListPage[Model](data=data, first_id=data[0].id if data else None,
                               last_id=data[-1].id if data else None)

    # ---- integrations --------------------------------------------------------------------------
    # Routes of the enabled integrations (`vllm-batch curation`'s status and training file, the
    # monitoring's /metrics): behind the same keys, with the same error shapes (an integration raises
    # batch_pipeline.domain.batches.BatchNotFound for an unknown batch), and a `{batch_id}` or `{file_id}` in
    # their path is checked against the key's tenant before they run (visible_ids above).
    for router in integration_routers(settings):
        app.include_router(router)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        message = str(first.get("msg", "invalid request"))
        return error_response(422, f"{'.'.join(loc)}: {message}" if loc else message, ".".join(loc) or None,
                              "invalid_value")

    @app.exception_handler(BatchNotFound)
    async def batch_not_found(_: Request, exc: BatchNotFound) -> JSONResponse:
        return error_response(404, f"No batch found with id '{exc}'.", "batch_id", "not_found")

    @app.exception_handler(FileNotFound)
    async def file_not_found(_: Request, exc: FileNotFound) -> JSONResponse:
        return error_response(404, f"No such File object: {exc}", "file_id", "not_found")

    @app.exception_handler(BatchRequestError)
    async def bad_request(_: Request, exc: BatchRequestError) -> JSONResponse:
        return error_response(400, str(exc), exc.param, exc.code)


DATABASE_RETRY_AFTER_S = 5


def _add_database_handlers(app: FastAPI, settings: Settings) -> None:
    """The instance's database down or restarting answers 503 (Retry-After), in OpenAI's error shape: the
    openai client retries it, and the next request after the database is back is served as usual."""
    from sqlalchemy.exc import DBAPIError

    errors: list[type[Exception]] = [DBAPIError]
    if settings.postgres_url is not None:  # the instance loads dagster-postgres then; SQLite never raises it
        from dagster_postgres.utils import DagsterPostgresException

        errors.append(DagsterPostgresException)

    async def database_down(_: Request, exc: Exception) -> JSONResponse:
        # Its type only: a driver's message may carry the connection string.
        log.warning("the instance's database did not answer: %s", type(exc).__name__)
        return error_response(503, "the batch service's database is not answering; try again in a few seconds",
                              code="database_unavailable", kind="server_error",
                              headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})

    for error in errors:
        app.add_exception_handler(error, database_down)


def _form_expires_after(fields: dict[str, str]) -> int | None:
    """The seconds of an upload's `expires_after[anchor]` / `expires_after[seconds]` fields, or a 400."""
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor is None or seconds is None or not seconds.strip().isdigit():
        raise BatchRequestError("expires_after needs an anchor ('created_at') and a whole number of seconds",
                                "expires_after", "invalid_value")
    try:
        return expires_seconds(ExpiresAfter(anchor=anchor, seconds=int(seconds)), "expires_after")
    except ValueError as exc:
        raise BatchRequestError(str(exc), "expires_after", "invalid_value") from None


async def _enforce_windows(service: BatchService) -> None:
    """Close completion windows and delete expired files even when nobody is reading the batches."""
    while True:
        await asyncio.sleep(WINDOW_CHECK_INTERVAL_S)
        try:
            await run_in_threadpool(service.enforce_stops)
        except Exception:  # a failed sweep must not stop the next one
            log.exception("checking completion windows failed")
        try:
            for file_id in await run_in_threadpool(service.expire_files):
                log.info("file %s expired and was deleted", file_id)
        except Exception:
            log.exception("deleting expired files failed")
