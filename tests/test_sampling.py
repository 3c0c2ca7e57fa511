"""Sampling parameters reach vLLM, the chat template is applied, and an engine refusal is one line's error.

Every test drives the session's real engine (tests/conftest.py: `loaded_engine`) through the same
conversion the pipeline uses (batch_pipeline/domain/openai_bodies.py), with a few short requests each. The tiny
model's text is gibberish but deterministic; `ignore_eos` fixes output lengths where a test needs them.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from batch_pipeline.domain.openai_bodies import prepare_requests, response_body
from batch_pipeline.domain.records import BODY_MODELS, CHAT_URL, COMPLETIONS_URL
from resources.engine_types import EngineFailure, EngineRequest

PROMPT = "Tell me a story about a lighthouse"


def chat(content: str | list = PROMPT, **params) -> tuple[str, dict]:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, **params}
    return CHAT_URL, body


def completion(prompt: str | list = PROMPT, **params) -> tuple[str, dict]:
    return COMPLETIONS_URL, {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, **params}


def generate(engine, requests: list[tuple[str, dict]]) -> list[dict]:
    """Each request's OpenAI response body, all run together on the engine, as batch_chunks runs them."""
    keys = itertools.count()
    prepared: list[EngineRequest] = []
    for url, body in requests:
        # As batch_input stores it: validated, then dumped as compact JSON.
        stored = BODY_MODELS[url].model_validate(body).model_dump_json(exclude_none=True, by_alias=True)
        [request] = prepare_requests(keys, url, stored, engine.tokenizer, engine.max_model_len)
        prepared.append(request)
    bodies: dict[int, dict] = {}
    for request, output in engine.stream(prepared):
        assert not isinstance(output, EngineFailure), output.message
        bodies[request.key] = response_body(request, output, "tiny-llama")
    return [bodies[request.key] for request in prepared]


def text(body: dict) -> str:
    choice = body["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def test_temperature_samples_across_seeds_and_zero_is_greedy(loaded_engine):
    sampled = generate(loaded_engine, [chat(temperature=1.0, seed=seed) for seed in range(6)])
    greedy = generate(loaded_engine, [chat(temperature=0, seed=seed) for seed in range(6)])
    assert len(Counter(text(b) for b in sampled)) > 1
    assert len({text(b) for b in greedy}) == 1


def test_top_k_1_equals_greedy_and_a_seed_reproduces(loaded_engine):
    greedy, *top1 = generate(loaded_engine, [chat()] + [chat(temperature=1.0, top_k=1, seed=s) for s in range(3)])
    assert all(text(b) == text(greedy) for b in top1)
    first = generate(loaded_engine, [chat(temperature=1.0, seed=11), chat(temperature=1.0, seed=12)])
    # The same seed alone, and among other requests, in a later engine call.
    again = generate(loaded_engine, [chat(temperature=1.0, seed=11)])
    among = generate(loaded_engine, [chat("other", temperature=1.0, seed=5), chat(temperature=1.0, seed=11)])
    assert text(again[0]) == text(first[0]) == text(among[1])
    assert text(first[1]) != text(first[0])


def test_stop_ends_the_text_before_the_stop_string(loaded_engine):
    [full_body] = generate(loaded_engine, [completion(max_tokens=30)])
    full = text(full_body)
    middle = len(full) // 2
    stop = next(full[i:i + 3] for i in range(middle, len(full) - 3) if full[i:i + 3].strip() == full[i:i + 3])
    [cut] = generate(loaded_engine, [completion(max_tokens=30, stop=[stop])])
    assert text(cut) == full[:full.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < 30


def test_min_tokens_and_max_tokens_bound_the_length(loaded_engine):
    [full_body] = generate(loaded_engine, [completion(max_tokens=20)])
    full = text(full_body)
    stop = full[:3]  # at the very start: without min_tokens the text ends at once
    short, bounded, capped = generate(loaded_engine, [
        completion(max_tokens=20, stop=[stop], ignore_eos=False),
        completion(max_tokens=20, stop=[stop], min_tokens=8, ignore_eos=False),
        completion(max_tokens=5),
    ])
    assert short["usage"]["completion_tokens"] < 8 and text(short) == ""
    assert bounded["usage"]["completion_tokens"] >= 8
    assert capped["usage"]["completion_tokens"] == 5 and capped["choices"][0]["finish_reason"] == "length"
    assert full.startswith(text(capped))


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 2.0}, {"presence_penalty": 2.0},
                                     {"frequency_penalty": 2.0}])
def test_penalties_change_the_greedy_output(loaded_engine, penalty):
    plain, penalised = generate(loaded_engine, [chat(max_tokens=32), chat(max_tokens=32, **penalty)])
    assert text(plain) != text(penalised)


def test_chat_logprobs_and_n_have_openai_shapes(loaded_engine):
    greedy, sampled = generate(loaded_engine, [
        chat(max_tokens=6, logprobs=True, top_logprobs=3),
        chat(max_tokens=6, logprobs=True, top_logprobs=0, n=3, temperature=0.9, seed=4),
    ])
    body = ChatCompletion.model_validate(greedy)
    [choice] = body.choices
    assert len(choice.logprobs.content) == body.usage.completion_tokens == 6
    for position in choice.logprobs.content:
        ranked = [top.logprob for top in position.top_logprobs]
        assert len(ranked) == 3 and ranked == sorted(ranked, reverse=True) and ranked[0] <= 0
        assert position.logprob == pytest.approx(ranked[0], abs=1e-4)  # temperature 0 takes the likeliest token
        assert position.bytes == list(position.token.encode())
    assert "".join(p.token for p in choice.logprobs.content) == choice.message.content

    body = ChatCompletion.model_validate(sampled)
    assert [c.index for c in body.choices] == [0, 1, 2]
    assert body.usage.completion_tokens == 18
    assert all(len(c.logprobs.content) == 6 and all(p.top_logprobs == [] for p in c.logprobs.content)
               for c in body.choices)
    assert len({c.message.content for c in body.choices}) > 1


def test_completion_logprobs_and_n_have_openai_shapes(loaded_engine):
    plain, sampled = generate(loaded_engine, [completion(max_tokens=5, logprobs=2),
                                              completion(max_tokens=5, n=2, temperature=0.9, seed=8)])
    body = Completion.model_validate(plain)
    logprobs = body.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert all(value == pytest.approx(max(top.values()), abs=1e-4)
               for value, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True))
    body = Completion.model_validate(sampled)
    assert [c.index for c in body.choices] == [0, 1] and all(c.logprobs is None for c in body.choices)
    assert body.usage.completion_tokens == 10


def template_tokens(tokenizer, messages: list[dict]) -> int:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_prompt_tokens_are_the_chat_template_of_every_turn(loaded_engine):
    turns = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me more"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "first part, "},
                                          {"type": "text", "text": "second part"}]}]
    conversation, multipart, bare = generate(loaded_engine, [
        (CHAT_URL, {"messages": turns, "max_tokens": 2}),
        (CHAT_URL, {"messages": parts, "max_tokens": 2}),
        completion("Hi there", max_tokens=2),
    ])
    tokenizer = loaded_engine.tokenizer
    assert conversation["usage"]["prompt_tokens"] == template_tokens(tokenizer, turns)
    assert multipart["usage"]["prompt_tokens"] == template_tokens(
        tokenizer, [{"role": "user", "content": "first part, second part"}])
    # The template really adds something: the bare prompt is shorter than the same text as a user turn.
    assert bare["usage"]["prompt_tokens"] < template_tokens(tokenizer, [{"role": "user", "content": "Hi there"}])


def test_a_request_the_engine_refuses_at_admission_fails_alone(loaded_engine):
    from vllm import SamplingParams

    # Past batch_pipeline's own length check, straight to the engine: vLLM's admission refuses it.
    params = SamplingParams(max_tokens=2, temperature=0)
    requests = [EngineRequest(0, [5, 6, 7], params, COMPLETIONS_URL, False, 0),
                EngineRequest(1, [5] * (loaded_engine.max_model_len + 100), params, COMPLETIONS_URL, False, 0),
                EngineRequest(2, [8, 9, 10], params, COMPLETIONS_URL, False, 0)]
    finished = {request.key: output for request, output in loaded_engine.stream(requests)}
    assert sorted(finished) == [0, 1, 2]
    assert isinstance(finished[1], EngineFailure) and str(loaded_engine.max_model_len) in finished[1].message
    assert not isinstance(finished[0], EngineFailure) and not isinstance(finished[2], EngineFailure)


def test_an_engine_refusal_becomes_that_lines_error_and_the_batch_goes_on(loaded_engine, tmp_path: Path):
    from assets.batch_input import REQUEST_SCHEMA
    from batch_pipeline.domain.chunks import ChunkJob, run_chunks
    from resources.storage import BatchPaths

    prompts = [[5, 6, 7], [5, 10**7], "Item 3 is", "Item 4 is"]  # line 2: an id outside the vocabulary
    rows = [{"line": i + 1, "custom_id": f"c{i}", "url": COMPLETIONS_URL,
             "body": json.dumps({"prompt": prompt, "max_tokens": 3, "temperature": 0})}
            for i, prompt in enumerate(prompts)]
    paths = BatchPaths(tmp_path)
    paths.requests.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=REQUEST_SCHEMA), paths.requests)
    written = []
    run_chunks(loaded_engine, ChunkJob(paths, "b", "tiny-llama", 2, 4), written.append)
    assert sorted((r.index, r.failed) for r in written) == [(0, 1), (1, 0)]
    result = {row["line"]: row for i in (0, 1) for row in pq.read_table(paths.chunk(i)).to_pylist()}
    error = json.loads(result[2]["error"])
    assert error["code"] == "engine_error" and "vocabulary" in error["message"] and error["line"] == 2
    assert all(result[line]["error"] is None and json.loads(result[line]["response"])["status_code"] == 200
               for line in (1, 3, 4))
