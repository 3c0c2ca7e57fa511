"""GCSHandler: a batch's result files in a Google Cloud Storage bucket under PREFIX/BATCH_ID/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import PrivateAttr

from batch_pipeline.domain.settings import Settings
from integrations.result_handlers.base import ObjectStoreHandler

# Uploads above this are resumable, in chunks of this size (a multiple of 256 KiB).
CHUNK_BYTES = 16 * 1024 * 1024


class GCSHandler(ObjectStoreHandler):
    """Uploads to gs://BUCKET/PREFIX/BATCH_ID/; credentials from Application Default Credentials.

    With `endpoint_url` (an emulator such as fake-gcs-server) the client is anonymous.
    """

    handler_name = "gcs"
    requires = ("google.cloud.storage",)
    extra = "gcs"

    project: str | None = None
    endpoint_url: str | None = None
    _bucket: Any = PrivateAttr(default=None)

    @classmethod
    def from_settings(cls, settings: Settings) -> GCSHandler:
        if not settings.gcs_bucket:
            raise ValueError("the GCS result handler needs VBATCH_GCS_BUCKET")
        return cls(bucket=settings.gcs_bucket, prefix=settings.gcs_prefix, project=settings.gcs_project,
                   endpoint_url=settings.gcs_endpoint_url)

    def gcs_bucket(self) -> Any:
        """The google-cloud-storage Bucket, created once per handler instance."""
        if self._bucket is None:
            from google.cloud import storage

            if self.endpoint_url:
                from google.auth.credentials import AnonymousCredentials

                client = storage.Client(project=self.project or "emulator", credentials=AnonymousCredentials(),
                                        client_options={"api_endpoint": self.endpoint_url})
            else:
                client = storage.Client(project=self.project)
            self._bucket = client.bucket(self.bucket)
        return self._bucket

    def uri(self, key: str) -> str:
        return f"gs://{self.bucket}/{key}"

    def remote_sha256(self, key: str) -> str | None:
        blob = self.gcs_bucket().get_blob(key)
        return None if blob is None else (blob.metadata or {}).get("sha256")

    def upload_file(self, key: str, path: Path, sha256: str) -> None:
        blob = self.gcs_bucket().blob(key, chunk_size=CHUNK_BYTES)
        blob.metadata = {"sha256": sha256}
        # crc32c is checked by the library on upload; a damaged transfer raises instead of landing.
        blob.upload_from_filename(str(path), checksum="crc32c")

    def upload_bytes(self, key: str, data: bytes, sha256: str) -> None:
        blob = self.gcs_bucket().blob(key)
        blob.metadata = {"sha256": sha256}
        blob.upload_from_string(data, content_type="application/json", checksum="crc32c")
