"""The checks a batch file gets while it streams in (JsonlCheck), fed the way the multipart parser feeds them."""

from __future__ import annotations

import pytest

from batch_pipeline.entrypoints.api.uploads import JsonlCheck, UploadError

LIMIT = 1024
REQUEST = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}'


def check(data: bytes, piece: int = 7) -> None:
    """Feed `data` in pieces of `piece` bytes, then finish (as the parser does, in arbitrary pieces)."""
    checker = JsonlCheck(LIMIT)
    for start in range(0, len(data), piece):
        checker.feed(data[start:start + piece])
    checker.finish()


def refused(data: bytes, piece: int = 7) -> UploadError:
    with pytest.raises(UploadError) as caught:
        check(data, piece)
    return caught.value


@pytest.mark.parametrize("data", [
    b"",  # empty: taking a batch in refuses it later, with its own message
    REQUEST + b"\n",
    REQUEST,  # no final newline
    b"\n\r\n  \n" + REQUEST + b"\r\n",  # blank lines first, CRLF
    b"\xef\xbb\xbf" + REQUEST + b"\n",  # a UTF-8 byte order mark
    REQUEST + b"\n{not json\n[1]\n",  # later bad lines are the pipeline's business (error records)
    REQUEST + b"\n" + b"x" * LIMIT + b"\n" + b"y" * LIMIT,  # lines of exactly the limit
    REQUEST.replace(b'"a"', '"caf\u00e9 \u65e5\u672c"'.encode()) + b"\n",  # multi-byte characters split across pieces
])
def test_batch_files_pass(data: bytes):
    for piece in (1, 3, 7, 4096):
        check(data, piece)


def test_a_line_over_the_limit_is_refused_at_its_line():
    error = refused(REQUEST + b"\n" + b"x" * (LIMIT + 1) + b"\n")
    assert error.code == "line_too_long" and str(error).startswith("line 2 of the file is longer than")
    assert refused(b"x" * 10 * LIMIT, piece=LIMIT // 2).code == "line_too_long"  # no newline at all


@pytest.mark.parametrize("data, message", [
    (REQUEST + b"\n\x00\n", f"the file has a NUL byte at offset {len(REQUEST) + 1}"),
    (REQUEST + b"\n\xff\xfe\n", f"the file is not UTF-8 text (invalid byte at offset {len(REQUEST) + 1})"),
    (REQUEST + b"\n" + "\u00e9".encode()[:1] + b"x", f"the file is not UTF-8 text (invalid byte at offset {len(REQUEST) + 1})"),
    (REQUEST + b"\n" + "\u00e9".encode()[:1], "the file ends inside a UTF-8 character"),
    (b"[1, 2]\n" + REQUEST, "line 1 of the file is not a JSON object"),
    (b"\n\n{not json\n" + REQUEST, "line 3 of the file is not a JSON object"),
    (b"\x89PNG\r\n", "the file is not UTF-8 text (invalid byte at offset 0)"),
    (b"just some text", "line 1 of the file is not a JSON object"),
])
def test_what_is_not_a_batch_file_is_refused_with_where(data: bytes, message: str):
    for piece in (1, 7, 4096):  # the same place, however the bytes arrive
        error = refused(data, piece)
        assert error.code == "invalid_file" and str(error).startswith(message), (piece, str(error))


def test_tenants_see_their_own_and_admins_see_all():
    from batch_pipeline.domain.tenancy import OPERATOR, Tenant, key_fingerprint

    one, other = key_fingerprint("key-one"), key_fingerprint("key-two")
    assert one != other and len(one) == 32 and "key-one" not in one and one == key_fingerprint("key-one")
    assert Tenant(one).sees(one) and not Tenant(one).sees(other) and not Tenant(one).sees(None)
    assert Tenant(None).sees(None) is False  # no key, no tenant: sees nothing
    assert all(t.sees(o) for t in (OPERATOR, Tenant(one, admin=True)) for o in (one, other, None))


def test_uploads_left_by_a_stopped_server_are_removed_at_start_and_fresh_ones_kept(tmp_path):
    import os
    import time

    from batch_pipeline.entrypoints.api.files import FileStore

    store = FileStore(tmp_path)
    stale, fresh = store.upload_path(), store.upload_path()
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"in progress")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert store.remove_stale_uploads(3600) == 1
    assert not stale.exists() and fresh.exists()
