"""Read an OpenAI batch input file as a stream and sort each line into a request or an error.

The file is never held in memory: lines are read one at a time with a length cap, so a 1,000,000-line
file costs the same memory as a 100-line one (plus one set of custom_ids for duplicate detection).

Each line is decoded once. The common well-formed line is accepted by batch_pipeline/domain/fast_lines.py
(msgspec); any other line takes the pydantic path below, which gives the verdict and the message.
A UTF-8 byte order mark at the very start of the file is skipped (Windows editors write one); anywhere
else it is an error. CRLF line ends are accepted.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from batch_pipeline.domain.fast_lines import MAX_NESTING, decode_line, nesting_depth
from batch_pipeline.domain.records import BODY_MODELS, SUPPORTED_URLS, BatchError, ErrorCode


class BatchFileError(Exception):
    """The file as a whole cannot be used (missing, unreadable, empty); one readable message."""


@dataclass(frozen=True, slots=True)
class ValidRequest:
    line: int
    custom_id: str
    url: str
    body: str  # the validated body, as compact JSON
    model: str | None


@dataclass(frozen=True, slots=True)
class InvalidLine:
    line: int
    custom_id: str | None
    error: BatchError


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


_BOM = b"\xef\xbb\xbf"


def raw_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number, bytes) with the newline (LF or CRLF) and a leading byte order mark stripped;
    bytes is None for an over-long line."""
    with path.open("rb") as handle:
        if handle.read(3) != _BOM:
            handle.seek(0)
        number = 0
        while True:
            raw = handle.readline(max_line_bytes + 1)
            if not raw:
                return
            number += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                # Skip the rest of the over-long line without loading it.
                while raw and not raw.endswith(b"\n"):
                    raw = handle.readline(1 << 20)
                yield number, None
                continue
            yield number, raw.rstrip(b"\r\n")


def scan_batch_file(
    path: Path,
    accepted_models: frozenset[str] | None,
    max_line_bytes: int = 8 * 1024 * 1024,
) -> Iterator[ValidRequest | InvalidLine]:
    """Validate every line of `path`; blank lines are skipped.

    `accepted_models` are the names a line's `body.model` may carry (None: any, the first one seen
    then binds the rest of the file).
    """
    if not path.exists():
        raise BatchFileError(f"input file not found: {path}")
    if not path.is_file():
        raise BatchFileError(f"input path is not a file: {path}")
    try:
        path.open("rb").close()
    except OSError as exc:
        raise BatchFileError(f"cannot read input file {path}: {exc.strerror}") from None

    seen_ids: set[str] = set()
    models = accepted_models
    for number, raw in raw_lines(path, max_line_bytes):
        if raw is None:
            yield InvalidLine(number, None, BatchError(
                code=ErrorCode.LINE_TOO_LONG, message=f"line is longer than {max_line_bytes} bytes", line=number))
            continue
        if not raw.strip():
            continue
        result = _fast_request(number, raw, seen_ids, models) or _check_raw_line(number, raw, seen_ids, models)
        if isinstance(result, ValidRequest):
            seen_ids.add(result.custom_id)
            if models is None and result.model is not None:
                models = frozenset({result.model})
        yield result


def _fast_request(number: int, raw: bytes, seen_ids: set[str], models: frozenset[str] | None) -> ValidRequest | None:
    """The request if the fast first pass accepts the line and it passes the checks across lines, else None."""
    fast = decode_line(raw)
    # A line failing a check here takes the pydantic path, which words the error.
    if (fast is not None and 0 < len(fast[0]) <= 512 and fast[0] not in seen_ids
            and (models is None or fast[3] is None or fast[3] in models)):
        return ValidRequest(number, *fast)
    return None


class _NotJSON(ValueError):
    """A line that Python's json module would take but JSON (RFC 8259) does not allow."""


def _no_constant(name: str) -> float:
    raise _NotJSON(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NotJSON(f"number {text if len(text) <= 24 else text[:20] + '...'} is out of range")
    return value


# A \u escape of a UTF-16 surrogate; only checked further when one is present.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _decode(text: str) -> object:
    """The line as a Python object, or _NotJSON with the reason."""
    if text.startswith("\ufeff"):
        raise _NotJSON("it starts with a byte order mark (U+FEFF), which only the start of the file may carry")
    try:
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as exc:
        raise _NotJSON(f"{exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise _NotJSON(f"it nests arrays and objects more than {MAX_NESTING} levels deep") from None
    except _NotJSON:
        raise
    except ValueError:  # int() refusing a number over sys.get_int_max_str_digits()
        raise _NotJSON(f"an integer has more than {sys.get_int_max_str_digits()} digits") from None
    if nesting_depth(obj, MAX_NESTING) > MAX_NESTING:
        raise _NotJSON(f"it nests arrays and objects more than {MAX_NESTING} levels deep")
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _NotJSON("a \\u escape encodes half of a UTF-16 surrogate pair, which is not a character") from None
    return obj


def _check_raw_line(number: int, raw: bytes, seen_ids: set[str], models: frozenset[str] | None) -> ValidRequest | InvalidLine:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return InvalidLine(number, None, BatchError(
            code=ErrorCode.INVALID_UTF8, message=f"line is not valid UTF-8 (byte {exc.start})", line=number))
    try:
        obj = _decode(text)
    except _NotJSON as exc:
        return InvalidLine(number, None, BatchError(
            code=ErrorCode.INVALID_JSON, message=f"line is not valid JSON: {exc}", line=number))
    return _check_line(number, obj, seen_ids, models)


_MAX_MESSAGE = 1000


def _shown(value: object) -> str:
    """repr(value), cut short so that a huge value cannot make a huge message."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _check_line(number: int, obj: object, seen_ids: set[str], models: frozenset[str] | None) -> ValidRequest | InvalidLine:
    def bad(code: str, message: str, custom_id: str | None = None) -> InvalidLine:
        if len(message) > _MAX_MESSAGE:  # e.g. a megabyte-long field name in pydantic's error location
            message = message[:_MAX_MESSAGE - 3] + "..."
        return InvalidLine(number, custom_id, BatchError(code=code, message=message, line=number))

    if not isinstance(obj, dict):
        return bad(ErrorCode.NOT_AN_OBJECT, f"line must be a JSON object, got {type(obj).__name__}")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return bad(ErrorCode.MISSING_CUSTOM_ID, "custom_id is missing or empty; every line needs a unique custom_id")
    if len(custom_id) > 512:
        return bad(ErrorCode.MISSING_CUSTOM_ID, "custom_id is longer than 512 characters")
    if custom_id in seen_ids:
        return bad(ErrorCode.DUPLICATE_CUSTOM_ID, f"custom_id {custom_id!r} was already used by an earlier line",
                   custom_id)
    if obj.get("method") != "POST":
        return bad(ErrorCode.INVALID_METHOD, f"method must be 'POST', got {_shown(obj.get('method'))}", custom_id)
    url = obj.get("url")
    if url not in SUPPORTED_URLS:
        return bad(ErrorCode.INVALID_URL, f"url must be one of {', '.join(SUPPORTED_URLS)}; got {_shown(url)}", custom_id)
    extra = set(obj) - {"custom_id", "method", "url", "body"}
    if extra:
        return bad(ErrorCode.INVALID_BODY, f"unknown top-level field(s): {', '.join(sorted(extra))}", custom_id)
    body = obj.get("body")
    if not isinstance(body, dict):
        return bad(ErrorCode.INVALID_BODY, "body must be a JSON object", custom_id)
    try:
        parsed = BODY_MODELS[url].model_validate(body)
    except ValidationError as exc:
        return bad(ErrorCode.INVALID_BODY, f"invalid body: {_first_error(exc)}", custom_id)
    except ValueError as exc:
        return bad(ErrorCode.INVALID_BODY, f"invalid body: {exc}", custom_id)
    model = getattr(parsed, "model", None)
    if model is not None and models is not None and model not in models:
        return bad(ErrorCode.MODEL_MISMATCH,
                   f"body.model {_shown(model)} differs from the batch's model ({', '.join(sorted(models))})", custom_id)
    return ValidRequest(
        line=number,
        custom_id=custom_id,
        url=url,
        body=parsed.model_dump_json(exclude_none=True, by_alias=True),
        model=model,
    )
