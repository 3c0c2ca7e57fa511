"""The curation routes of the Batch API: a batch's review status and its training file (read-only).

`GET /v1/batches/{batch_id}/curation` answers the batch's `CurationStatus`; `GET
/v1/batches/{batch_id}/curation/training` the `training.jsonl` that `curation_annotations` wrote. Both
read the files under `DATA_DIR/batches/<id>/curation/` and never call Label Studio, so they answer while
Label Studio is down.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse

from batch_pipeline.domain.batches import existing_batch
from batch_pipeline.domain.settings import Settings
from integrations.curation.records import CurationStatus
from integrations.curation.status import read_status, training_file
from resources.storage import location


def _not_yet(batch_id: str, what: str) -> JSONResponse:
    # The batch exists, its curation file does not (yet): OpenAI's error shape, its own code.
    body = {"error": {"message": f"Batch '{batch_id}' has no {what} yet: curation has not run for it.",
                      "type": "invalid_request_error", "param": "batch_id", "code": "curation_not_found"}}
    return JSONResponse(body, status_code=404)


def build_router(settings: Settings) -> APIRouter:
    """The curation routes for `vllm-batch serve` (behind its API keys)."""
    router = APIRouter(tags=["curation"])
    data_dir = location(settings.data_root)

    @router.get("/v1/batches/{batch_id}/curation", response_model=CurationStatus)
    def curation_status(batch_id: str) -> CurationStatus | JSONResponse:
        """A batch's review status: tasks selected, imported and annotated, accepted, rejected, corrected, rates."""
        status = read_status(existing_batch(data_dir, batch_id))
        return status if status is not None else _not_yet(batch_id, "curation status")

    @router.get("/v1/batches/{batch_id}/curation/training", response_class=FileResponse, response_model=None,
                responses={200: {"content": {"application/jsonl": {}},
                                 "description": "training.jsonl: OpenAI chat fine-tuning lines"}})
    def curation_training(batch_id: str) -> FileResponse | JSONResponse:
        """The batch's training.jsonl (accepted and corrected answers, OpenAI's chat fine-tuning format)."""
        path = training_file(existing_batch(data_dir, batch_id))
        if path is None:
            return _not_yet(batch_id, "training file")
        return FileResponse(path, media_type="application/jsonl", filename=f"{batch_id}-training.jsonl")

    return router
