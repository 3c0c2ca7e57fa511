"""Read a `multipart/form-data` upload as a stream: the file part goes to disk as it arrives, checked as it goes.

Starlette's own form parsing spools the whole body before the route runs, so a 50 GB upload would
fill the disk before any limit could be checked; this parser stops at the limit instead. The file part
is also checked as a batch file while it streams (JsonlCheck): a body of garbage is refused at its
first bad bytes, not after it has been written.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_FIELD_BYTES = 64 * 1024


class UploadError(Exception):
    """The body is not a usable multipart form, or its file is not a batch file; the message says why."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class UploadTooLarge(Exception):
    """The file part passed the size limit."""


class JsonlCheck:
    """What can be known of a batch file while it streams: UTF-8 text without NUL bytes, no line longer
    than `max_line_bytes` (its newline not counted, as the pipeline counts), and a first request line that
    is a JSON object.

    Anything else about a line (bad JSON further down, a missing field) stays the pipeline's business: it
    becomes a record of the batch's error file, as for a file given any other way.
    """

    def __init__(self, max_line_bytes: int):
        self.max_line_bytes = max_line_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._offset = 0  # bytes fed so far
        self._line = 1  # the number of the line being read
        self._line_bytes = 0  # its length so far
        self._head: bytearray | None = bytearray()  # the first non-blank line, until it has been checked

    def feed(self, data: bytes) -> None:
        """Check the next bytes of the file; UploadError at the first fault."""
        nul = data.find(b"\0")
        if nul >= 0:
            raise UploadError(f"the file has a NUL byte at offset {self._offset + nul}: a batch file is UTF-8 "
                              "JSONL text", "invalid_file")
        pending = len(self._utf8.getstate()[0])
        try:
            self._utf8.decode(data)
        except UnicodeDecodeError as exc:
            raise UploadError(f"the file is not UTF-8 text (invalid byte at offset {self._offset - pending + exc.start})"
                              ": a batch file is UTF-8 JSONL text", "invalid_file") from None
        start = 0
        while True:
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            self._line_bytes += end - start
            if self._line_bytes > self.max_line_bytes:
                raise UploadError(f"line {self._line} of the file is longer than the limit of {self.max_line_bytes} "
                                  "bytes", "line_too_long")
            if self._head is not None:
                self._head += data[start:end]
            if newline < 0:
                break
            self._end_line()
            start = newline + 1
        self._offset += len(data)

    def finish(self) -> None:
        """The file ended: check what the last bytes left open."""
        try:
            self._utf8.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UploadError("the file ends inside a UTF-8 character: a batch file is UTF-8 JSONL text",
                              "invalid_file") from None
        self._end_line()

    def _end_line(self) -> None:
        if self._head is not None and self._head.strip():
            text = self._head.decode("utf-8").lstrip("\ufeff")
            self._head = None
            try:
                first = json.loads(text)
            except ValueError:
                first = None
            if not isinstance(first, dict):
                raise UploadError(f"line {self._line} of the file is not a JSON object: a batch file is JSONL, one "
                                  "request object per line", "invalid_file")
        elif self._head is not None:
            self._head.clear()  # a blank line before the first request
        self._line += 1
        self._line_bytes = 0


@dataclass
class Form:
    """The fields of the form and the file part, already on disk."""

    fields: dict[str, str] = field(default_factory=dict)
    file_field: str | None = None
    filename: str | None = None
    file_bytes: int = 0


async def read_form(content_type: str, body: AsyncIterator[bytes], file_path: Path, limit: int,
                    max_line_bytes: int) -> Form:
    """Parse the form from `body`; the (single) file part is written to `file_path`, at most `limit` bytes,
    and checked as a batch file (JsonlCheck) before each piece is written."""
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UploadError("the body must be multipart/form-data with a boundary")

    form = Form()
    state: dict = {"headers": {}, "field": b"", "value": b"", "name": None, "is_file": False, "buffer": bytearray()}
    handle = None
    check = JsonlCheck(max_line_bytes)

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
            piece = data[start:end]
            check.feed(piece)  # before the write: refused bytes never reach the disk
            handle.write(piece)
        else:
            state["buffer"] += data[start:end]
            if len(state["buffer"]) > MAX_FIELD_BYTES:
                raise UploadError(f"form field {state['name']!r} is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end() -> None:
        if state["is_file"]:
            check.finish()
        elif state["name"] is not None:
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
