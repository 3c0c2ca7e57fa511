"""S3Handler: a batch's result files in an S3 bucket (AWS or any S3-compatible store) under PREFIX/BATCH_ID/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import PrivateAttr

from batch_pipeline.domain.settings import Settings
from integrations.result_handlers.base import DeliveryRefused, ObjectStoreHandler

# Answers that a retry will not change.
REFUSALS = {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
# Files above this go up in parts of this size, several at a time (boto3's managed transfer).
MULTIPART_BYTES = 16 * 1024 * 1024


class S3Handler(ObjectStoreHandler):
    """Uploads to s3://BUCKET/PREFIX/BATCH_ID/; credentials and region come from the usual AWS chain."""

    handler_name = "s3"
    requires = ("boto3",)
    extra = "s3"

    endpoint_url: str | None = None
    region: str | None = None
    _client: Any = PrivateAttr(default=None)

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Handler:
        if not settings.s3_bucket:
            raise ValueError("the S3 result handler needs VBATCH_S3_BUCKET")
        return cls(bucket=settings.s3_bucket, prefix=settings.s3_prefix, endpoint_url=settings.s3_endpoint_url,
                   region=settings.s3_region)

    def client(self) -> Any:
        """One boto3 client per handler instance (path-style addressing suits S3-compatible stores)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(s3={"addressing_style": "path"} if self.endpoint_url else {},
                            retries={"max_attempts": 5, "mode": "standard"})
            self._client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)
        return self._client

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def remote_sha256(self, key: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client().head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey", "NotFound"):
                # A missing bucket also answers 404 to HEAD; ask once which it is.
                self._check_bucket()
                return None
            if code in REFUSALS:
                raise DeliveryRefused(f"s3://{self.bucket}: {code}") from exc
            raise
        return head.get("Metadata", {}).get("sha256")

    def _check_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client().head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("404", "NoSuchBucket", *REFUSALS):
                raise DeliveryRefused(f"s3://{self.bucket}: no such bucket, or no access ({code})") from exc
            raise

    def upload_file(self, key: str, path: Path, sha256: str) -> None:
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)
        self.client().upload_file(str(path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}},
                                  Config=transfer)

    def upload_bytes(self, key: str, data: bytes, sha256: str) -> None:
        self.client().put_object(Bucket=self.bucket, Key=key, Body=data, Metadata={"sha256": sha256},
                                 ContentType="application/json")
