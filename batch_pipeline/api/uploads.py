"""Read a `multipart/form-data` upload as a stream: the file part goes to disk as it arrives, with a size cap.

Starlette's own form parsing spools the whole body before the route runs, so a 50 GB upload would
fill the disk before any limit could be checked; this parser stops at the limit instead.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_FIELD_BYTES = 64 * 1024


class UploadError(Exception):
    """The body is not a usable multipart form; the message says why."""


class UploadTooLarge(Exception):
    """The file part passed the size limit."""


@dataclass
class Form:
    """The fields of the form and the file part, already on disk."""

    fields: dict[str, str] = field(default_factory=dict)
    file_field: str | None = None
    filename: str | None = None
    file_bytes: int = 0


async def read_form(content_type: str, body: AsyncIterator[bytes], file_path: Path, limit: int) -> Form:
    """Parse the form from `body`; the (single) file part is written to `file_path`, at most `limit` bytes."""
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UploadError("the body must be multipart/form-data with a boundary")

    form = Form()
    state: dict = {"headers": {}, "field": b"", "value": b"", "name": None, "is_file": False, "buffer": bytearray()}
    handle = None

    def on_part_begin() -> None:
        state.update(headers={}, name=None, is_file=False, buffer=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        nonlocal handle
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition"))
        name = disposition.get(b"name")
        if name is None:
            raise UploadError("a form part has no name")
        state["name"] = name.decode("utf-8", "replace")
        if b"filename" in disposition:
            if form.file_field is not None:
                raise UploadError("send one file per request")
            state["is_file"] = True
            form.file_field = state["name"]
            form.filename = os.path.basename(disposition[b"filename"].decode("utf-8", "replace")) or "upload.jsonl"
            handle = file_path.open("wb")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["is_file"]:
            form.file_bytes += end - start
            if form.file_bytes > limit:
                raise UploadTooLarge(f"the file is larger than the limit of {limit} bytes")
            assert handle is not None  # opened when the file part began
            handle.write(data[start:end])
        else:
            state["buffer"] += data[start:end]
            if len(state["buffer"]) > MAX_FIELD_BYTES:
                raise UploadError(f"form field {state['name']!r} is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end() -> None:
        if not state["is_file"] and state["name"] is not None:
            form.fields[state["name"]] = state["buffer"].decode("utf-8", "replace")

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
    })
    try:
        async for chunk in body:
            parser.write(chunk)
        parser.finalize()
        if handle is not None:
            handle.flush()
            os.fsync(handle.fileno())
    except MultipartParseError as exc:
        raise UploadError(f"malformed multipart body: {exc}") from None
    finally:
        if handle is not None:
            handle.close()
    return form
