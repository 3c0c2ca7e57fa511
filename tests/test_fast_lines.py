"""The msgspec first pass (batch_pipeline/domain/fast_lines.py) never accepts a line the pydantic path refuses,
and what it stores means the same body."""

from __future__ import annotations

import json
import random

from batch_pipeline.domain.fast_lines import DROPPED_FIELDS, FAST_BODIES, _GenerativeBody, decode_line, nesting_depth
from batch_pipeline.domain.input_file import ValidRequest, _check_raw_line, _fast_request, raw_lines
from batch_pipeline.domain.records import (
    _IGNORED_FIELDS,
    BODY_MODELS,
    CHAT_URL,
    COMPLETIONS_URL,
    EMBEDDINGS_URL,
    GenerativeBody,
)
from tests.fuzz_corpus import build_corpus

BASES = {
    CHAT_URL: {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    COMPLETIONS_URL: {"model": "m", "prompt": "once upon"},
    EMBEDDINGS_URL: {"model": "m", "input": "text"},
}
FIELDS = ["model", "temperature", "top_p", "seed", "stop", "n", "presence_penalty", "frequency_penalty", "max_tokens",
          "top_k", "min_tokens", "repetition_penalty", "ignore_eos", "user", "store", "metadata", "service_tier",
          "stream", "stream_options", "parallel_tool_calls", "messages", "max_completion_tokens", "logprobs",
          "top_logprobs", "response_format", "prompt", "input", "encoding_format", "dimensions", "tools", "moodel"]
VALUES = [None, "other-model", 0, 1, -1, 2, 3, 20, 21, 128, 129, 0.0, 0.5, 1.5, 2.5, -2.5, 1e-9, 2**63, -(2**63) - 1, 10**20, True,
          False, "", "0.5", "m", "float", "base64", "hex", [], [""], ["a"], ["a", "b", "c", "d"], ["a", "b", "c", "d", "e"],
          [1, 2], [True], ["a", 1], [[1], [2]], [[]], [[1, "a"]], {}, {"a": "b"}, {"a": {"b": 1}}, {"include_usage": True},
          [{"role": "user", "content": "x"}], [{"role": "robot", "content": "x"}], [{"role": "user"}],
          [{"role": "user", "content": None}], [{"role": "user", "content": [{"type": "text", "text": "t"}]}],
          [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}], [{"role": "tool", "content": "x",
          "tool_call_id": "c"}], [{"role": "user", "content": "x", "name": None}],
          {"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": None},
          {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}, "strict": True}},
          {"type": "json_schema", "json_schema": {"schema": {"type": "object"}, "strict": "yes"}},
          {"type": "json_schema", "json_schema": {"json_schema": {"type": "object"}}},
          {"type": "json_schema", "json_schema": {"schema": {"a": [[[[[[[[1]]]]]]]]}, "description": "d"}},
          {"type": "xml"}]
ENVELOPES = [("custom_id", ["", "x" * 512, "x" * 513, 7, None, "é", "taken"]), ("method", ["GET", None, "post"]),
             ("url", ["/v1/responses", None, 1]), ("extra", [1])]


def variations(seed: int, count: int) -> list[bytes]:
    """Seeded lines: a valid base with up to two fields set to awkward values, sometimes a bad envelope."""
    rng = random.Random(seed)
    lines = []
    for index in range(count):
        url = rng.choice(list(BASES))
        body = dict(BASES[url])
        for _ in range(rng.randint(0, 2)):
            body[rng.choice(FIELDS)] = rng.choice(VALUES)
        line: dict = {"custom_id": f"v-{index}", "method": "POST", "url": url, "body": body}
        if rng.random() < 0.1:
            key, values = rng.choice(ENVELOPES)
            line[key] = rng.choice(values)
        lines.append(json.dumps(line).encode())
    return lines


def agree(raw: bytes, models: frozenset[str] | None = frozenset({"m"})) -> tuple[bool, bool]:
    """(fast accepted, reference accepted); fails if the fast pass takes a line the reference refuses."""
    fast = _fast_request(1, raw, {"taken"}, models)
    reference = _check_raw_line(1, raw, {"taken"}, models)
    if fast is None:
        return False, isinstance(reference, ValidRequest)
    assert isinstance(reference, ValidRequest), (raw[:300], reference)
    url, body = fast.url, fast.body
    assert (fast.custom_id, url, fast.model) == (reference.custom_id, reference.url, reference.model)
    # The same body for every consumer: the engine side validates the stored JSON with the same model.
    assert BODY_MODELS[url].model_validate_json(body) == BODY_MODELS[url].model_validate_json(reference.body)
    return True, True


def test_the_fast_pass_is_never_looser_than_the_pydantic_models():
    results = [agree(raw) for raw in variations(seed=11, count=6000)]
    fast_accepted = sum(fast for fast, _ in results)
    reference_accepted = sum(ref for _, ref in results)
    # Both verdicts occur often enough for the check to mean something.
    assert 300 < fast_accepted <= reference_accepted < len(results) - 300


def test_the_fast_pass_agrees_on_every_line_of_the_fuzz_corpus(tmp_path):
    lines = build_corpus(tmp_path / "corpus.jsonl", seed=3, big_line_bytes=1024)
    fast = 0
    for _number, raw in raw_lines(tmp_path / "corpus.jsonl", 1 << 20):
        assert raw is not None
        if raw.strip():
            fast += agree(raw, None)[0]
    assert fast >= sum(line.expect == "good" for line in lines) // 2


def test_the_common_shapes_take_the_fast_pass():
    for url, body in BASES.items():
        line = json.dumps({"custom_id": "a", "method": "POST", "url": url, "body": {**body, "max_tokens": 5}
                           if url != EMBEDDINGS_URL else body}).encode()
        assert decode_line(line) is not None, url
    assert set(FAST_BODIES) <= set(BODY_MODELS)
    assert set(DROPPED_FIELDS) <= _IGNORED_FIELDS


def test_each_struct_has_the_fields_of_its_pydantic_model():
    # The bounds are checked by the agreement tests above; this catches a field added on one side only.
    assert list(_GenerativeBody.__struct_fields__) == list(GenerativeBody.model_fields)
    for url, struct in FAST_BODIES.items():
        fast = [name for name in struct.__struct_fields__ if name not in DROPPED_FIELDS]
        assert fast == [name for name in BODY_MODELS[url].model_fields if name not in DROPPED_FIELDS], url


def test_nesting_depth_counts_levels_of_arrays_and_objects():
    assert [nesting_depth(v, 10) for v in (1, [], {}, [1, {}], {"a": [[{"b": 1}]]})] == [0, 1, 1, 2, 4]
    assert nesting_depth([[[[[[]]]]]], 3) == 4  # stops counting past the limit
