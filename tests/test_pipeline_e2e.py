"""The whole pipeline on a real vLLM engine (CPU build, tiny model), on SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process
from tests.support.files import read_jsonl, write_jsonl
from tests.support.inprocess import by_id, run_batch
from tests.support.request_lines import MODEL_NAME, chat_line, completion_line


def starts_a_json_object(text: str) -> bool:
    """Whether `text` is the start of a JSON object: closing what it left open makes it one."""
    closers, in_string, escaped = [], False, False
    for char in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "{[":
            closers.append("}" if char == "{" else "]")
        elif char in "}]" and (not closers or closers.pop() != char):
            return False
    body = text + ("n" if escaped else "") + ('"' if in_string else "")
    for ending in ("", "null", ":null"):  # a value (or a key's colon and value) the text stopped before
        for start in (body, body.rstrip().removesuffix(",")):
            try:
                if isinstance(json.loads(start + ending + "".join(reversed(closers))), dict):
                    return True
            except ValueError:
                continue
    return False


@pytest.mark.parametrize("storage", ["sqlite", "postgres"])
def test_batch_runs_end_to_end_with_openai_shaped_output(storage, request, settings, tiny_model, loaded_engine):
    instance = request.getfixturevalue(f"{storage}_instance")
    lines = [chat_line(f"chat-{i}", f"Tell me about item {i}") for i in range(40)]
    lines += [completion_line(f"cmpl-{i}", f"Item {i} is") for i in range(10)]
    result, outputs, errors = run_batch(settings, instance, tiny_model, lines)

    assert errors == []
    assert [o["custom_id"] for o in outputs] == [line["custom_id"] for line in lines]  # input order, no duplicates
    for record in outputs:
        assert record["error"] is None and record["id"].startswith("batch_req_")
        assert record["response"]["status_code"] == 200
        body = record["response"]["body"]
        parsed = (ChatCompletion if record["custom_id"].startswith("chat") else Completion).model_validate(body)
        assert parsed.model == MODEL_NAME
        assert 0 < parsed.usage.completion_tokens <= 8
        assert parsed.usage.total_tokens == parsed.usage.prompt_tokens + parsed.usage.completion_tokens
    assert result.summary["completed"] == 50 and result.summary["failed"] == 0
    assert result.summary["chunks_run"] == 4  # 50 requests in chunks of 16

    # The run, its partition and its materialisations are in the instance (what the UI reads).
    assert instance.get_run_by_id(result.run_id).is_success
    for asset in ("batch_input", "batch_chunks", "batch_results"):
        from dagster import AssetKey

        event = instance.get_latest_materialization_event(AssetKey(asset))
        assert event is not None and event.dagster_event.partition == "b1"


def test_sampling_parameters_are_honoured(settings, sqlite_instance, tiny_model, loaded_engine):
    schema = {"type": "object", "properties": {"label": {"enum": ["yes", "no"]}}, "required": ["label"],
              "additionalProperties": False}
    lines = [
        chat_line("n3", "Pick", n=3, temperature=0.9, seed=7),
        chat_line("n3-again", "Pick", n=3, temperature=0.9, seed=7),
        chat_line("logprobs", "Hello", logprobs=True, top_logprobs=3),
        chat_line("limit", "Hello", max_completion_tokens=3, max_tokens=None),
        chat_line("schema", "Answer yes or no", max_tokens=40,
             response_format={"type": "json_schema", "json_schema": {"name": "label", "schema": schema, "strict": True}}),
        chat_line("json-object", "Answer in JSON", max_tokens=60, response_format={"type": "json_object"}),
        chat_line("penalties", "Hello", presence_penalty=1.5, frequency_penalty=1.0, top_p=0.5, temperature=0.7, seed=1),
        # Greedy, with and without penalties: the penalties must reach the sampler and change the text.
        chat_line("greedy", "Hello", max_tokens=16, ignore_eos=True),
        chat_line("greedy-penalised", "Hello", max_tokens=16, ignore_eos=True, presence_penalty=2.0,
                  frequency_penalty=2.0),
        completion_line("cmpl-logprobs", "The quick brown", logprobs=2),
        completion_line("stop", "The quick brown", max_tokens=30),
    ]
    _, outputs, errors = run_batch(settings, sqlite_instance, tiny_model, lines)
    assert errors == []
    out = {k: v["response"]["body"] for k, v in by_id(outputs).items()}

    assert len(out["n3"]["choices"]) == 3 and [c["index"] for c in out["n3"]["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in out["n3"]["choices"]] == \
        [c["message"]["content"] for c in out["n3-again"]["choices"]]  # same seed, same text

    content = ChatCompletion.model_validate(out["logprobs"]).choices[0].logprobs.content
    assert len(content) == out["logprobs"]["usage"]["completion_tokens"]
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)

    assert out["limit"]["usage"]["completion_tokens"] <= 3
    assert json.loads(out["schema"]["choices"][0]["message"]["content"])["label"] in ("yes", "no")
    json_object = out["json-object"]["choices"][0]
    content = json_object["message"]["content"]
    assert starts_a_json_object(content), content  # constrained from the first token to the last
    assert json_object["finish_reason"] == "length" or isinstance(json.loads(content), dict), json_object

    assert out["penalties"]["choices"][0]["finish_reason"] in ("stop", "length")
    assert out["penalties"]["usage"]["completion_tokens"] > 0
    greedy = out["greedy"]["choices"][0]["message"]["content"]
    penalised = out["greedy-penalised"]["choices"][0]["message"]["content"]
    assert greedy != penalised, greedy

    logprobs = Completion.model_validate(out["cmpl-logprobs"]).choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == out["cmpl-logprobs"]["usage"]["completion_tokens"]
    assert all(len(top) == 2 for top in logprobs.top_logprobs)

    # A stop string taken from the unconstrained text cuts the output right before it.
    full = out["stop"]["choices"][0]["text"]
    # Three characters of its second half, not blank, that occur there for the first time.
    stop = next(full[i:i + 3] for i in range(len(full) // 2, len(full) - 2)
                if full[i:i + 3].strip() and full.index(full[i:i + 3]) == i)
    _, outputs2, _ = run_batch(settings, sqlite_instance, tiny_model,
                               [completion_line("stop", "The quick brown", max_tokens=30, stop=[stop])], batch_id="b2")
    cut = outputs2[0]["response"]["body"]["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


def test_completions_take_every_prompt_form_with_openai_choice_order(settings, sqlite_instance, tiny_model,
                                                                     loaded_engine):
    first, second = "Item 1 is", "Item 2 is"
    ids = [list(loaded_engine.tokenizer.encode(text)) for text in (first, second)]
    lines = [
        completion_line("first", first), completion_line("second", second),
        completion_line("strings", [first, second]), completion_line("ids", ids[0]), completion_line("id-lists", ids),
        completion_line("n2-first", first, n=2, temperature=0.9, seed=5),
        completion_line("n2-second", second, n=2, temperature=0.9, seed=5),
        completion_line("n2-both", [first, second], n=2, temperature=0.9, seed=5),
    ]
    _, outputs, errors = run_batch(settings, sqlite_instance, tiny_model, lines, batch_id="prompts")
    assert errors == []
    out = {k: Completion.model_validate(v["response"]["body"]) for k, v in by_id(outputs).items()}

    def texts(key: str) -> list[str]:
        assert [c.index for c in out[key].choices] == list(range(len(out[key].choices)))
        return [c.text for c in out[key].choices]

    assert texts("strings") == texts("first") + texts("second")  # one choice per prompt, in prompt order
    assert texts("ids") == texts("first") and texts("id-lists") == texts("strings")
    assert texts("n2-both") == texts("n2-first") + texts("n2-second")  # prompt i has indices i*n .. i*n+n-1
    usage = out["strings"].usage
    assert usage.prompt_tokens == out["first"].usage.prompt_tokens + out["second"].usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_bad_lines_become_error_records_and_valid_lines_still_run(settings, sqlite_instance, tiny_model, loaded_engine):
    good = [chat_line(f"ok-{i}", "Hello") for i in range(5)]
    lines = [
        good[0],
        "{not json",
        "[1, 2, 3]",
        {"method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}]}},
        {**good[1], "custom_id": ""},
        good[1],
        {**good[2], "custom_id": "ok-1"},  # duplicate of the line before
        {**good[2], "method": "GET"},
        {**good[2], "url": "/v1/images"},
        {**good[2], "body": {"model": MODEL_NAME}},  # no messages
        {**good[2], "body": {"model": MODEL_NAME, "prompt": "x"}},  # prompt on chat
        {**good[2], "body": {**good[2]["body"], "max_tokens": "ten"}},  # wrong type
        {**good[2], "body": {**good[2]["body"], "model": "another-model"}},
        chat_line("too-long", "word " * 2000),
        {"custom_id": "embed", "method": "POST", "url": "/v1/embeddings", "body": {"input": "hello"}},
        good[2],
        good[3],
        good[4],
    ]
    path = write_jsonl(settings.resolved_data_dir.parent / "bad.jsonl", lines)
    with path.open("ab") as handle:
        handle.write(b'{"custom_id": "latin1", "body": "caf\xe9"}\n')
        handle.write(b'{"custom_id": "huge", "pad": "' + b"x" * (settings.max_line_bytes + 10) + b'"}\n')
        handle.write(json.dumps(chat_line("last", "Hello")).encode() + b"\n")
    spec = register_local_batch(settings, sqlite_instance, path, str(tiny_model), MODEL_NAME, batch_id="bad")
    result = run_batch_in_process(settings, sqlite_instance, spec.batch_id)
    assert result.success, result.error
    outputs, errors = read_jsonl(result.paths.output), read_jsonl(result.paths.errors)

    assert [o["custom_id"] for o in outputs] == ["ok-0", "ok-1", "ok-2", "ok-3", "ok-4", "last"]
    codes = [(e["error"]["line"], e["error"]["code"]) for e in errors]
    assert codes == [
        (2, "invalid_json"), (3, "invalid_request"), (4, "missing_custom_id"), (5, "missing_custom_id"),
        (7, "duplicate_custom_id"), (8, "invalid_method"), (9, "invalid_url"), (10, "invalid_body"),
        (11, "invalid_body"), (12, "invalid_body"), (13, "model_mismatch"), (14, "context_length_exceeded"),
        (15, "unsupported_endpoint"), (19, "invalid_utf8"), (20, "line_too_long"),
    ]
    assert all(e["response"] is None and e["error"]["message"] for e in errors)
    assert result.summary["failed"] == len(errors)


def test_rerun_after_partial_chunks_only_computes_missing_chunks(settings, sqlite_instance, tiny_model, loaded_engine):
    lines = [chat_line(f"r-{i}", f"Item {i}") for i in range(48)]  # 3 chunks of 16
    first, outputs, _ = run_batch(settings, sqlite_instance, tiny_model, lines, batch_id="resume")
    chunk1 = first.paths.chunk(1)
    kept = {i: first.paths.chunk(i).stat().st_mtime_ns for i in (0, 2)}
    chunk1.unlink()  # as if the run had died before chunk 1 was written

    second, outputs_again, _ = run_batch(settings, sqlite_instance, tiny_model, lines, batch_id="resume")
    assert second.summary["chunks_resumed"] == 2 and second.summary["chunks_run"] == 1
    assert {i: first.paths.chunk(i).stat().st_mtime_ns for i in (0, 2)} == kept
    assert [o["custom_id"] for o in outputs_again] == [line["custom_id"] for line in lines]
    assert [o["id"] for o in outputs_again] == [o["id"] for o in outputs]


def test_an_embeddings_batch_runs_on_a_pooling_engine(settings, sqlite_instance, tiny_model):
    # Runs last in this module: it swaps the session's generative engine for a pooling one.
    from openai.types import CreateEmbeddingResponse

    def embed(custom_id, value):
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
                "body": {"model": MODEL_NAME, "input": value}}

    lines = [embed("one", "the quick brown fox"), embed("two", ["the quick brown fox", "a lazy dog"]),
             embed("ids", [5, 6, 7, 8]), chat_line("chat", "Hello"), embed("long", "word " * 2000),
             embed("dims", "x") | {"body": {"input": "x", "dimensions": 8}},
             embed("b64", "the quick brown fox") | {"body": {"input": "the quick brown fox",
                                                             "encoding_format": "base64"}}]
    _, outputs, errors = run_batch(settings, sqlite_instance, tiny_model, lines, batch_id="emb")
    bodies = {o["custom_id"]: o["response"]["body"] for o in outputs}
    # base64 (the official client's default): little-endian float32, which the client decodes the same way.
    encoded = bodies.pop("b64")["data"][0]["embedding"]
    assert isinstance(encoded, str)
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist()
    out = {k: CreateEmbeddingResponse.model_validate(body) for k, body in bodies.items()}
    assert decoded == pytest.approx(out["one"].data[0].embedding, rel=1e-6)
    assert sorted(out) == ["ids", "one", "two"]
    assert [len(out[k].data) for k in ("one", "two", "ids")] == [1, 2, 1]
    assert all(len(d.embedding) == 256 for r in out.values() for d in r.data)  # the tiny model's hidden size
    assert out["one"].data[0].embedding == out["two"].data[0].embedding  # same text, same vector
    assert out["one"].data[0].embedding != out["two"].data[1].embedding
    assert out["ids"].usage.prompt_tokens == 4
    assert {e["custom_id"]: e["error"]["code"] for e in errors} == {
        "chat": "unsupported_endpoint", "long": "context_length_exceeded", "dims": "invalid_body"}


def test_the_fuzz_corpus_runs_end_to_end(settings, sqlite_instance, tiny_model, loaded_engine):
    """Every good line of tests/fuzz_corpus.py is answered, every bad line is one error record, nothing crashes."""
    from tests.fuzz_corpus import build_corpus

    path = settings.resolved_data_dir.parent / "fuzz.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = build_corpus(path, seed=7, big_line_bytes=settings.max_line_bytes + 10)
    spec = register_local_batch(settings, sqlite_instance, path, str(tiny_model), MODEL_NAME, batch_id="fuzz")
    result = run_batch_in_process(settings, sqlite_instance, spec.batch_id)
    assert result.success, result.error
    outputs, errors = read_jsonl(result.paths.output), read_jsonl(result.paths.errors)

    answered = {o["custom_id"] for o in outputs if o["response"]["status_code"] == 200}
    good = [line for line in lines if line.expect == "good"]
    assert {line.custom_id for line in good} <= answered
    bad = {line.number for line in lines if line.expect == "bad"}
    error_lines = [e["error"]["line"] for e in errors]
    assert bad <= set(error_lines)
    assert len(error_lines) == len(set(error_lines))  # one record per line
    assert len(outputs) + len(errors) == sum(line.expect != "blank" for line in lines)
    assert all(e["response"] is None and e["error"]["message"] and "Traceback" not in e["error"]["message"]
               for e in errors)
