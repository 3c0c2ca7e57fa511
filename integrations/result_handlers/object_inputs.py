"""Batch input files from object storage: `vllm-batch run/submit s3://bucket/key` and `gs://bucket/key`.

The object is downloaded once, streamed to disk in parts (never held in memory), into
DATA_DIR/inputs/<scheme>/<bucket>/<key>, and the batch runs from that copy. A sidecar file remembers the
object's version (S3 ETag, GCS generation), so submitting the same URI again downloads nothing unless the
object changed. Endpoints and credentials are the result handlers' (VBATCH_S3_ENDPOINT_URL, the AWS chain,
VBATCH_GCS_ENDPOINT_URL, Application Default Credentials).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from batch_pipeline.domain.settings import Settings
from resources.storage import atomic_path

_URI = re.compile(r"^(s3|gs)://([^/]+)/(.+)$")
SCHEMES = ("s3://", "gs://")


class ObjectInputError(Exception):
    """The object cannot be fetched; one readable line."""


def is_object_uri(value: str) -> bool:
    """Whether an input argument names an object (s3:// or gs://) rather than a local file."""
    return value.startswith(SCHEMES)


def fetch_object(settings: Settings, uri: str) -> Path:
    """The local copy of the object at `uri`, downloaded unless an up-to-date copy is there already."""
    match = _URI.match(uri)
    if not match or ".." in match.group(3).split("/"):
        raise ObjectInputError(f"not an object URI: {uri!r} (expected s3://BUCKET/KEY or gs://BUCKET/KEY)")
    scheme, bucket, key = match.groups()
    target = settings.resolved_data_dir / "inputs" / scheme / bucket / key
    fetch = _fetch_s3 if scheme == "s3" else _fetch_gcs
    fetch(settings, bucket, key, target, uri)
    return target


def _up_to_date(target: Path, version: str) -> bool:
    sidecar = target.with_name(target.name + ".source.json")
    try:
        return target.is_file() and json.loads(sidecar.read_text())["version"] == version
    except (FileNotFoundError, ValueError, KeyError):
        return False


def _remember(target: Path, uri: str, version: str) -> None:
    with atomic_path(target.with_name(target.name + ".source.json")) as tmp:
        tmp.write_text(json.dumps({"uri": uri, "version": version}))


def _missing_extra(extra: str, package: str) -> ObjectInputError:
    return ObjectInputError(f"{extra}:// inputs need the '{extra}' extra (missing {package}): "
                            f"pip install 'vllm-batch-pipeline[{extra}]'")


def _fetch_s3(settings: Settings, bucket: str, key: str, target: Path, uri: str) -> None:
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise _missing_extra("s3", "boto3") from None
    from integrations.result_handlers.s3_handler import S3Handler

    client = S3Handler(bucket=bucket, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region).client()
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        version = head["ETag"]
        if not _up_to_date(target, version):
            with atomic_path(target) as tmp:
                # Ranged GETs written to disk part by part (boto3's managed transfer), never whole in memory.
                client.download_file(bucket, key, str(tmp))
            _remember(target, uri, version)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        reason = "no such object" if code in ("404", "NoSuchKey", "NotFound") else code
        raise ObjectInputError(f"cannot read {uri}: {reason}") from None
    except BotoCoreError as exc:
        raise ObjectInputError(f"cannot read {uri}: {exc}") from None


def _fetch_gcs(settings: Settings, bucket: str, key: str, target: Path, uri: str) -> None:
    try:
        from google.api_core.exceptions import GoogleAPIError
    except ImportError:
        raise _missing_extra("gcs", "google-cloud-storage") from None
    from integrations.result_handlers.gcs_handler import GCSHandler

    gcs_bucket = GCSHandler(bucket=bucket, project=settings.gcs_project, endpoint_url=settings.gcs_endpoint_url).gcs_bucket()
    try:
        blob = gcs_bucket.get_blob(key)
        if blob is None:
            raise ObjectInputError(f"cannot read {uri}: no such object")
        version = str(blob.generation)
        if not _up_to_date(target, version):
            with atomic_path(target) as tmp:
                # Chunked download of exactly this generation, crc32c-checked by the client.
                blob.chunk_size = 16 * 1024 * 1024
                blob.download_to_filename(str(tmp), if_generation_match=blob.generation, checksum="crc32c")
            _remember(target, uri, version)
    except GoogleAPIError as exc:
        raise ObjectInputError(f"cannot read {uri}: {exc}") from None
