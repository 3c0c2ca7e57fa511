"""Unit tests: how each line of a batch file is sorted into a request or an error record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batch_pipeline.domain.input_file import BatchFileError, InvalidLine, ValidRequest, scan_batch_file
from tests.support.files import write_jsonl

CHAT = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}


def scan(path: Path, models=frozenset({"m"}), max_line_bytes=4096):
    return list(scan_batch_file(path, models, max_line_bytes))


def codes(items) -> list[tuple[int, str]]:
    return [(i.line, i.error.code) for i in items if isinstance(i, InvalidLine)]


def test_valid_lines_keep_their_line_numbers_and_blank_lines_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [CHAT, "", {**CHAT, "custom_id": "b"}])
    items = scan(path)
    assert [(i.line, i.custom_id) for i in items] == [(1, "a"), (3, "b")]
    assert all(isinstance(i, ValidRequest) for i in items)
    assert json.loads(items[0].body)["messages"][0]["content"] == "hi"


@pytest.mark.parametrize(("line", "code"), [
    ("{oops", "invalid_json"),
    ("42", "invalid_request"),
    ({**CHAT, "custom_id": 7}, "missing_custom_id"),
    ({**CHAT, "custom_id": "x" * 513}, "missing_custom_id"),
    ({**CHAT, "method": "PUT"}, "invalid_method"),
    ({**CHAT, "url": "/v1/images/generations"}, "invalid_url"),
    ({**CHAT, "extra": 1}, "invalid_body"),
    ({**CHAT, "body": []}, "invalid_body"),
    ({**CHAT, "body": {"messages": []}}, "invalid_body"),
    ({**CHAT, "body": {"messages": [{"role": "robot", "content": "x"}]}}, "invalid_body"),
    ({**CHAT, "body": {**CHAT["body"], "temperature": 3}}, "invalid_body"),
    ({**CHAT, "body": {**CHAT["body"], "n": "2"}}, "invalid_body"),
    ({**CHAT, "body": {**CHAT["body"], "stream": True}}, "invalid_body"),
    ({**CHAT, "body": {**CHAT["body"], "tools": []}}, "invalid_body"),
    ({**CHAT, "body": {**CHAT["body"], "stop": ["a", "b", "c", "d", "e"]}}, "invalid_body"),
    ({**CHAT, "body": {**CHAT["body"], "model": "other"}}, "model_mismatch"),
    ({"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": ["a", 1]}}, "invalid_body"),
    ({"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": [[1, 2], []]}}, "invalid_body"),
    ({"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": []}}, "invalid_body"),
    ({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
      "body": {"input": "x", "encoding_format": "hex"}}, "invalid_body"),
])
def test_each_kind_of_bad_line_gets_its_own_code(tmp_path, line, code):
    if isinstance(line, dict) and line.get("custom_id") == "a":
        line = {**line, "custom_id": "bad"}  # only the defect under test, not also a duplicate id
    path = write_jsonl(tmp_path / "in.jsonl", [CHAT, line, {**CHAT, "custom_id": "last"}])
    items = scan(path)
    assert codes(items) == [(2, code)]
    assert [i.custom_id for i in items if isinstance(i, ValidRequest)] == ["a", "last"]


@pytest.mark.parametrize("prompt", ["a", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completions_take_every_prompt_form_openai_accepts(tmp_path, prompt):
    line = {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": prompt}}
    assert codes(scan(write_jsonl(tmp_path / "in.jsonl", [line]))) == []


def test_embeddings_take_base64_encoding_and_dimensions(tmp_path):
    line = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
            "body": {"input": "x", "encoding_format": "base64", "dimensions": 8}}
    assert codes(scan(write_jsonl(tmp_path / "in.jsonl", [line]))) == []


def test_later_duplicates_are_rejected_and_the_first_kept(tmp_path):
    items = scan(write_jsonl(tmp_path / "in.jsonl", [CHAT, CHAT, CHAT]))
    assert isinstance(items[0], ValidRequest)
    assert codes(items) == [(2, "duplicate_custom_id"), (3, "duplicate_custom_id")]


def test_invalid_utf8_and_over_long_lines_do_not_stop_the_scan(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"custom_id": "caf\xe9"}\n' + b"x" * 10_000 + b"\n" + json.dumps(CHAT).encode() + b"\n")
    items = scan(path)
    assert codes(items) == [(1, "invalid_utf8"), (2, "line_too_long")]
    assert isinstance(items[2], ValidRequest) and items[2].line == 3


def test_first_model_binds_the_batch_when_none_is_given(tmp_path):
    lines = [CHAT, {**CHAT, "custom_id": "b", "body": {**CHAT["body"], "model": "n"}}]
    items = scan(write_jsonl(tmp_path / "in.jsonl", lines), models=None)
    assert codes(items) == [(2, "model_mismatch")]


def test_a_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(BatchFileError, match="not found"):
        scan(tmp_path / "absent.jsonl")
    with pytest.raises(BatchFileError, match="not a file"):
        scan(tmp_path)


def test_a_bom_at_the_start_crlf_ends_and_a_last_line_without_newline_are_accepted(tmp_path):
    line = json.dumps(CHAT).encode()
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line + b"\r\n" + line.replace(b'"a"', b'"b"') + b"\r\n\r\n"
                     + line.replace(b'"a"', b'"c"'))
    items = scan(path)
    assert [(i.line, i.custom_id) for i in items if isinstance(i, ValidRequest)] == [(1, "a"), (2, "b"), (4, "c")]


def test_a_bom_inside_the_file_is_one_clear_error(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(json.dumps(CHAT).encode() + b"\n\xef\xbb\xbf" + json.dumps({**CHAT, "custom_id": "b"}).encode())
    [error] = [i for i in scan(path) if isinstance(i, InvalidLine)]
    assert (error.line, error.error.code) == (2, "invalid_json")
    assert "byte order mark" in error.error.message


def test_a_huge_value_makes_a_short_message(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{**CHAT, "url": "/v1/" + "x" * 100_000},
                                               {**CHAT, "custom_id": "b", "body": {**CHAT["body"], "y" * 10_000: 1}}])
    errors = [i.error for i in scan(path, max_line_bytes=1 << 20)]
    assert [e.code for e in errors] == ["invalid_url", "invalid_body"]
    assert all(len(e.message) <= 1000 for e in errors)
