"""The fuzz corpus (tests/fuzz_corpus.py) through the line validation: one verdict per line, no crash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from batch_pipeline.domain.input_file import InvalidLine, ValidRequest, scan_batch_file
from batch_pipeline.domain.intake import survey
from tests.fuzz_corpus import FuzzLine, build_corpus
from tests.support.files import REPO


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[FuzzLine]]:
    path = tmp_path_factory.mktemp("fuzz") / "corpus.jsonl"
    return path, build_corpus(path, seed=7)


def readable(message: str) -> bool:
    return bool(message) and message.isprintable() and len(message) <= 1000 and "Traceback" not in message


def test_the_corpus_is_the_same_for_the_same_seed(tmp_path, corpus):
    path, lines = corpus
    again = build_corpus(tmp_path / "again.jsonl", seed=7)
    assert again == lines and (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()
    assert {line.expect for line in lines} == {"good", "bad", "any", "blank"}


def test_every_line_gets_exactly_its_verdict(corpus):
    path, lines = corpus
    items = list(scan_batch_file(path, None))  # default 8 MiB line cap; the corpus has a 10 MiB line

    by_line: dict[int, list[ValidRequest | InvalidLine]] = {}
    for item in items:
        by_line.setdefault(item.line, []).append(item)
    for line in lines:
        got = by_line.get(line.number, [])
        if line.expect == "blank":
            assert got == [], line
            continue
        assert len(got) == 1, (line, got)
        item = got[0]
        if line.expect == "good":
            assert isinstance(item, ValidRequest), (line, item)
            assert item.custom_id == line.custom_id
            json.loads(item.body)
        elif line.expect == "bad":
            assert isinstance(item, InvalidLine), (line, item)
        if isinstance(item, InvalidLine):
            assert item.error.line == line.number and readable(item.error.message), (line, item.error)
    assert len(items) == sum(line.expect != "blank" for line in lines)


def test_hostile_lines_get_the_documented_codes(corpus):
    path, lines = corpus
    kinds = {line.number: line.kind for line in lines}
    errors = {kinds[item.line]: (item.error.code, item.error.message)
              for item in scan_batch_file(path, None) if isinstance(item, InvalidLine) and kinds[item.line] != "mutation"}
    codes = {kind: code for kind, (code, _) in errors.items()}
    assert codes["huge-line"] == "line_too_long"
    assert codes["random-bytes"] == codes["invalid-utf8-halfway"] == "invalid_utf8"
    for kind in ("deep-arrays-100k", "deep-objects-5k", "deep-schema", "deep-metadata"):
        assert errors[kind] == ("invalid_json", "line is not valid JSON: it nests arrays and objects more than 64 "
                                                "levels deep"), kind
    assert errors["int-10^5000"] == errors["seed-5000-digits"] == (
        "invalid_json", "line is not valid JSON: an integer has more than 4300 digits")
    assert errors["temperature-1e400"] == ("invalid_json", "line is not valid JSON: number 1e400 is out of range")
    assert errors["temperature-NaN"] == ("invalid_json", "line is not valid JSON: NaN is not a JSON value")
    assert codes["repetition-penalty-1e400"] == codes["top-p-Infinity"] == "invalid_json"
    assert codes["lone-surrogate"] == codes["nul-in-string"] == codes["nul-only"] == "invalid_json"
    assert errors["bom-mid-file"] == ("invalid_json", "line is not valid JSON: it starts with a byte order mark "
                                                      "(U+FEFF), which only the start of the file may carry")
    assert codes["truncated-last-line"] == codes["trailing-garbage"] == codes["two-objects"] == "invalid_json"
    assert codes["duplicate-id"] == "duplicate_custom_id"
    assert codes["not-an-object"] == "invalid_request"
    for kind in ("mixed-prompt", "stream-true", "n-null", "unknown-top-level"):
        assert codes[kind] == "invalid_body", kind


def test_the_survey_reads_the_corpus_without_failing(corpus):
    path, lines = corpus
    found = survey(path, 8 * 1024 * 1024)
    assert found.lines == sum(line.expect != "blank" for line in lines)
    assert found.models.get("tiny-llama") == 1  # the first line, behind its byte order mark
    assert found.urls["/v1/chat/completions"] == 1


def test_memory_stays_bounded_by_the_line_cap(corpus):
    """A child process scans the corpus; its peak RSS grows by a few line buffers, not the file."""
    path, _ = corpus
    code = (
        "import resource, sys; from pathlib import Path\n"
        "from batch_pipeline.domain.input_file import scan_batch_file\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"count = sum(1 for _ in scan_batch_file(Path({str(path)!r}), None, 1024 * 1024))\n"
        "print(count, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    count, grown_mib = map(int, out.split())
    assert count > 0
    assert path.stat().st_size > 10 * 2**20
    assert grown_mib < 16, f"peak RSS grew by {grown_mib} MiB scanning a {path.stat().st_size >> 20} MiB file"
