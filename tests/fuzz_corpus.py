"""A seeded JSONL fuzz corpus for batch input files: hostile lines interleaved with valid requests.

    python -m tests.fuzz_corpus corpus.jsonl [--seed 7] [--big-line-mib 10]

`build_corpus(path, seed)` writes the file (the same bytes for the same seed) and returns one FuzzLine per
physical line, saying what the pipeline must do with it: "good" is accepted, "bad" is exactly one error
record, "any" is one or the other (random byte mutations of a valid line, whose validity is not known in
advance), "blank" gives no record. Every line ends with LF or CRLF except the last, a truncated request.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

MODEL = "tiny-llama"
CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"


@dataclass(frozen=True)
class FuzzLine:
    number: int
    expect: str  # "good" | "bad" | "any" | "blank"
    kind: str  # what the line holds, for failure messages
    custom_id: str | None = None  # for good lines: the id its answer carries


def _chat(custom_id: str, content: object = "Hello", **params: object) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0,
            **params}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT_URL, "body": body}


def _completion(custom_id: str, prompt: object, **params: object) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, **params}
    return {"custom_id": custom_id, "method": "POST", "url": COMPLETIONS_URL, "body": body}


def _dumps(record: object) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


def _nested(depth: int) -> object:
    value: object = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def _good_lines(rng: random.Random, index: int) -> tuple[str, bytes]:
    """A valid request of one of several shapes, its kind and bytes."""
    cid = f"good-{index}"
    shapes: list[tuple[str, dict]] = [
        ("chat", _chat(cid, f"Tell me about item {index}")),
        ("chat-unicode", _chat(cid, "Grüße, 東京, emoji \U0001f600 and an escaped NUL \u0000 here")),
        ("chat-parts", _chat(cid, [{"type": "text", "text": "part one"}, {"type": "text", "text": " part two"}])),
        ("chat-system-stop", {**_chat(cid), "body": {
            **_chat(cid, stop=["\n", "END"], top_p=0.9, seed=index)["body"],
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}}),
        ("chat-ignored-fields", _chat(cid, "Hi", user="u-1", metadata={"deep": _nested(20)}, store=False)),
        ("chat-lax-number", _chat(cid, "Hi", temperature="0.5")),  # pydantic's lax mode: a numeric string
        ("chat-null-fields", _chat(cid, "Hi", top_p=None, stop=None, seed=None)),
        ("chat-json-object", _chat(cid, "Reply in JSON", response_format={"type": "json_object"})),
        ("completion-text", _completion(cid, f"Item {index} is")),
        ("completion-list", _completion(cid, ["First", "Second"])),
        ("completion-tokens", _completion(cid, [1, 2, 3, 4])),
        ("completion-token-lists", _completion(cid, [[5, 6], [7, 8, 9]])),
        ("chat-big-int", _chat(cid, "Hi", seed=2**62)),
        ("chat-float-exponent", _chat(cid, "Hi", temperature=1e-3, top_p=5e-1)),
        ("chat-duplicate-key", _chat(cid, "Hi")),
    ]
    kind, record = shapes[rng.randrange(len(shapes))]
    raw = _dumps(record)
    if kind == "chat-duplicate-key":  # JSON objects with a repeated key: the last one wins, as in json.loads
        raw = raw.replace(b'"temperature": 0', b'"temperature": 2.5, "temperature": 0')
    return kind, raw


def _bad_lines(rng: random.Random, index: int, big_line_bytes: int) -> list[tuple[str, bytes]]:
    """Every kind of hostile line, once each (the caller shuffles them in among the good ones)."""
    cid = f"bad-{index}"
    valid = _dumps(_chat(cid, "Hello there, this line is valid until it is not"))
    half = len(valid) // 2
    random_bytes = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))).replace(b"\n", b"\xff")
    return [
        ("random-bytes", b"\xfe" + random_bytes),
        ("random-ascii", bytes(rng.randrange(33, 127) for _ in range(80))),
        ("deep-arrays-100k", b"[" * 100_000 + b"]" * 100_000),
        ("deep-objects-5k", b'{"a":' * 5_000 + b"1" + b"}" * 5_000),
        ("deep-schema", _dumps(_chat(cid + "-schema", "x", response_format={
            "type": "json_schema", "json_schema": {"name": "s", "schema": _nested(100)}}))),
        ("deep-metadata", _dumps(_chat(cid + "-meta", "x", metadata={"a": _nested(70)}))),
        ("temperature-1e400", valid.replace(b'"temperature": 0', b'"temperature": 1e400')),
        ("repetition-penalty-1e400", valid.replace(b'"temperature": 0', b'"repetition_penalty": 1e400')),
        ("seed-5000-digits", valid.replace(b'"temperature": 0', b'"seed": ' + b"9" * 5000)),
        ("int-10^5000", b"1" + b"0" * 5000),
        ("temperature-NaN", valid.replace(b'"temperature": 0', b'"temperature": NaN')),
        ("top-p-Infinity", valid.replace(b'"temperature": 0', b'"top_p": -Infinity')),
        ("huge-line", b'{"custom_id": "' + cid.encode() + b'-huge", "pad": "' + b"x" * big_line_bytes + b'"}'),
        ("nul-in-string", valid[:half] + b"\x00" + valid[half:]),
        ("nul-only", b"\x00" * 16),
        ("bom-mid-file", b"\xef\xbb\xbf" + _dumps(_chat(cid + "-bom", "x"))),
        ("invalid-utf8-halfway", valid[:half] + b"\xc3\x28\xff" + valid[half:]),
        ("lone-surrogate", valid.replace(b"Hello there", b"Hello \\ud800 there")),
        ("not-an-object", rng.choice([b"[]", b'"text"', b"null", b"true", b"42", b"-0.5e3"])),
        ("duplicate-id", _dumps(_chat("good-0", "again"))),
        ("mixed-prompt", _dumps(_completion(cid + "-mix", ["a", 1]))),
        ("stream-true", _dumps(_chat(cid + "-stream", "x", stream=True))),
        ("n-null", _dumps(_chat(cid + "-n", "x", n=None))),
        ("unknown-top-level", valid.replace(b'"method"', b'"extra": 1, "method"')),
        ("trailing-garbage", valid + b" x"),
        ("two-objects", valid + valid),
        ("crlf-bad", b"{oops}\r"),
    ]


def _mutated(rng: random.Random, index: int) -> bytes:
    """A valid line with one random byte replaced, deleted or duplicated (its own id namespace)."""
    raw = bytearray(_dumps(_chat(f"mut-{index}", f"Mutate me {index}", top_p=0.5)))
    at = rng.randrange(len(raw))
    action = rng.randrange(3)
    if action == 0:
        raw[at] = rng.choice([b for b in range(256) if b != 0x0A])
    elif action == 1:
        del raw[at]
    else:
        raw.insert(at, raw[at])
    return bytes(raw)


def build_corpus(path: Path, seed: int = 7, good: int = 60, mutations: int = 30,
                 big_line_bytes: int = 10 * 1024 * 1024) -> list[FuzzLine]:
    """Write the corpus to `path`; the expectation for each of its lines, in order."""
    rng = random.Random(seed)
    entries: list[tuple[str, str, bytes, str | None]] = []  # expect, kind, bytes, custom_id
    for index in range(1, good):
        kind, raw = _good_lines(rng, index)
        entries.append(("good", kind, raw, f"good-{index}"))
    entries += [("bad", kind, raw, None) for kind, raw in _bad_lines(rng, 1, big_line_bytes)]
    entries += [("any", "mutation", _mutated(rng, index), None) for index in range(mutations)]
    entries += [("blank", "blank", raw, None) for raw in (b"", b"   ", b"\t", b"\r", b" \r")]
    rng.shuffle(entries)
    # The first line is a valid request behind a UTF-8 byte order mark (it binds the model, and the
    # duplicate-id line refers to it); the last is a request cut off without its newline.
    first = ("good", "bom-at-file-start", b"\xef\xbb\xbf" + _dumps(_chat("good-0", "first")), "good-0")
    last = ("bad", "truncated-last-line", _dumps(_chat("cut", "cut short"))[:40], None)
    entries = [first, *entries, last]

    lines: list[FuzzLine] = []
    with path.open("wb") as out:
        for number, (expect, kind, raw, custom_id) in enumerate(entries, start=1):
            ending = b"" if number == len(entries) else (b"\r\n" if rng.random() < 0.3 else b"\n")
            out.write(raw + ending)
            if expect == "any" and not raw.strip():
                expect = "blank"
            lines.append(FuzzLine(number, expect, kind, custom_id))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--big-line-mib", type=int, default=10)
    args = parser.parse_args()
    lines = build_corpus(args.path, args.seed, big_line_bytes=args.big_line_mib * 1024 * 1024)
    counts = {expect: sum(line.expect == expect for line in lines) for expect in ("good", "bad", "any", "blank")}
    print(f"{args.path}: {len(lines)} lines, {counts}")


if __name__ == "__main__":
    main()
