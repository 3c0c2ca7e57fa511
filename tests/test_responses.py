"""`/v1/responses` lines: validated like the other endpoints, run on the generative engine, answered with
`response` objects that the official `openai` package's `Response` model accepts."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from openai.types.responses import Response

from batch_pipeline.domain.chunks import engine_args_for
from batch_pipeline.domain.input_file import InvalidLine, ValidRequest, scan_batch_file
from batch_pipeline.domain.intake import IntakeError, model_for_endpoint
from batch_pipeline.domain.openai_bodies import prepare_requests
from batch_pipeline.domain.records import RESPONSES_URL
from tests.support.files import write_jsonl
from tests.support.inprocess import by_id, run_batch
from tests.support.request_lines import LONG_PROMPT, MODEL_NAME, chat_line, completion_line

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["yes", "no"]}}, "required": ["label"],
          "additionalProperties": False}


def respond(custom_id: str, input_, **params) -> dict:
    body = {"model": MODEL_NAME, "input": input_, "max_output_tokens": 8, "temperature": 0, **params}
    return {"custom_id": custom_id, "method": "POST", "url": RESPONSES_URL, "body": body}


def scan(tmp_path: Path, lines: list) -> list:
    return list(scan_batch_file(write_jsonl(tmp_path / "in.jsonl", lines), None))


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def template_ids(tokenizer, turns: list[dict]) -> list[int]:
    """The tokenizer's own rendering of a conversation, ready for the assistant's turn."""
    ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_every_input_shape_is_a_valid_line(tmp_path):
    results = scan(tmp_path, [
        respond("string", "Hello"),
        respond("easy", [{"role": "user", "content": "Hello"}]),
        respond("parts", [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
                instructions="Answer briefly"),
        # An earlier response's output item sent back as history, as clients do.
        respond("history", [{"role": "user", "content": "Hi"},
                            {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                             "content": [{"type": "output_text", "text": "Hello", "annotations": []}]},
                            {"role": "developer", "content": "Be short"}, {"role": "user", "content": "Again"}]),
        respond("schema", "Pick", text={"format": {"type": "json_schema", "name": "label", "schema": SCHEMA,
                                                    "strict": True}}),
        # Fields OpenAI clients send by default that ask for nothing this engine lacks.
        respond("defaults", "Hi", tools=[], tool_choice="auto", store=False, stream=False, background=False,
                truncation="disabled", metadata={"k": "v"}, parallel_tool_calls=True, reasoning=None, top_p=0.9),
    ])
    assert all(isinstance(r, ValidRequest) for r in results), results
    stored = {r.custom_id: json.loads(r.body) for r in results}
    assert stored["schema"]["text"]["format"]["schema"] == SCHEMA  # kept under its OpenAI name
    assert "tools" not in stored["defaults"] and stored["defaults"]["top_p"] == 0.9


@pytest.mark.parametrize("params, named", [
    ({"tools": [{"type": "function", "name": "lookup", "parameters": {}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"stream": True}, "stream"),
    ({"background": True}, "background"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"input": [{"type": "function_call_output", "call_id": "c1", "output": "42"}]}, "function_call_output"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input_image"),
    ({"input": []}, "empty list"),
    ({"text": {"format": {"type": "json_schema", "name": "label"}}}, "text.format.schema is required"),
    ({"max_tokens": 5}, "max_tokens"),  # a chat field: the Responses API calls it max_output_tokens
    # Chat and completions fields the Responses API does not have.
    ({"n": 2}, "n: Extra inputs are not permitted"),
    ({"logprobs": True}, "logprobs: Extra inputs are not permitted"),
    ({"response_format": {"type": "json_object"}}, "response_format: Extra inputs are not permitted"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop: array too long. Expected an array with maximum length 4"),
])
def test_an_unsupported_feature_is_one_clear_error_for_that_line_only(tmp_path, params, named):
    bad = respond("bad", "Hello", **params)
    results = scan(tmp_path, [respond("before", "Hi"), bad, respond("after", "Hi")])
    assert [type(r) for r in results] == [ValidRequest, InvalidLine, ValidRequest]
    error = results[1].error
    assert error.code == "invalid_body" and named in error.message and error.line == 2, error.message
    assert "\n" not in error.message


@pytest.mark.parametrize("field, value", [
    ("temperature", 2.5), ("top_p", 0), ("seed", 1.5), ("stop", ["a", "b", "c", "d", "e"]), ("stop", [1]),
    ("presence_penalty", -2.5), ("frequency_penalty", 3), ("top_k", "5"), ("min_tokens", -1),
    ("repetition_penalty", 0), ("ignore_eos", "yes")])
def test_a_sampling_field_is_checked_alike_on_every_generative_endpoint(tmp_path, field, value):
    results = scan(tmp_path, [respond("responses", "Hi", **{field: value}), chat_line("chat", "Hi", **{field: value}),
                              completion_line("completions", "Hi", **{field: value})])
    assert all(isinstance(r, InvalidLine) and r.error.code == "invalid_body" for r in results), results
    messages = {r.error.message for r in results}
    assert len(messages) == 1 and f"body: {field}" in messages.pop()


def test_five_stop_sequences_are_refused_in_openais_words(tmp_path):
    [result] = scan(tmp_path, [chat_line("chat", "Hi", stop=["a", "b", "c", "d", "e"])])
    assert result.error.message == ("invalid body: stop: array too long. Expected an array with maximum length 4, "
                                    "but got an array with length 5 instead.")
    assert all(isinstance(r, ValidRequest) for r in scan(tmp_path, [
        respond("four", "Hi", stop=["a", "b", "c", "d"]), chat_line("one", "Hi", stop="a"), respond("none", "Hi", stop=None)]))


def test_a_body_becomes_the_chat_template_tokens_and_vllm_parameters(tmp_path, tokenizer):
    line = respond("r", [{"role": "user", "content": [{"type": "input_text", "text": "Is it "},
                                                      {"type": "input_text", "text": "good?"}]}],
                   instructions="Answer yes or no", max_output_tokens=12, temperature=0.5, top_p=0.8, seed=3,
                   stop=["END"], presence_penalty=0.5, frequency_penalty=-0.5, top_k=7, min_tokens=2,
                   repetition_penalty=1.1, ignore_eos=True,
                   text={"format": {"type": "json_schema", "name": "label", "schema": SCHEMA, "strict": True}})
    [valid] = scan(tmp_path, [line])
    [request] = prepare_requests(itertools.count(), valid.url, valid.body, tokenizer, 1024)
    assert request.prompt_token_ids == template_ids(
        tokenizer, [{"role": "system", "content": "Answer yes or no"}, {"role": "user", "content": "Is it good?"}])
    params = request.params
    assert (params.max_tokens, params.temperature, params.top_p, params.seed, params.n) == (12, 0.5, 0.8, 3, 1)
    assert (params.stop, params.presence_penalty, params.frequency_penalty, params.top_k, params.min_tokens,
            params.repetition_penalty, params.ignore_eos) == (["END"], 0.5, -0.5, 7, 2, 1.1, True)
    assert params.structured_outputs.json == SCHEMA  # as chat's response_format json_schema becomes
    assert request.echo["text"]["format"]["name"] == "label" and request.echo["instructions"] == "Answer yes or no"


def test_a_too_long_input_is_a_context_length_error(tmp_path, tokenizer):
    from batch_pipeline.domain.openai_bodies import RequestRejected

    [valid] = scan(tmp_path, [respond("long", "word " * 2000)])
    with pytest.raises(RequestRejected) as caught:
        prepare_requests(itertools.count(), valid.url, valid.body, tokenizer, 1024)
    assert caught.value.code == "context_length_exceeded" and "in the input" in str(caught.value)


@pytest.fixture
def api_settings(settings, tiny_model: Path, tmp_path: Path):
    """Settings with the tiny model served under its name and one API key."""
    import yaml
    from pydantic import SecretStr

    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"models": {MODEL_NAME: {"path": str(tiny_model)}}}))
    return settings.model_copy(update={"api_keys": SecretStr("k-test"), "models_file": models})


def test_responses_batches_run_on_the_generative_engine_and_name_their_endpoint(api_settings, tmp_path):
    assert "runner" not in engine_args_for({}, {RESPONSES_URL: 10, "/v1/embeddings": 2})
    path = write_jsonl(tmp_path / "in.jsonl", [respond("a", "Hi"), respond("b", "Ho")])
    assert model_for_endpoint(api_settings, path, RESPONSES_URL).name == MODEL_NAME
    with pytest.raises(IntakeError) as caught:
        model_for_endpoint(api_settings, path, "/v1/chat/completions")
    assert caught.value.param == "endpoint"


def test_the_api_creates_a_responses_batch_for_the_official_client(api_settings, tmp_path):
    from fastapi.testclient import TestClient
    from openai import OpenAI

    from batch_pipeline.entrypoints.api.app import create_app

    path = write_jsonl(tmp_path / "in.jsonl", [respond("a", "Hi")])
    with TestClient(create_app(api_settings)) as http, \
            OpenAI(base_url="http://testserver/v1", api_key="k-test", http_client=http, max_retries=0) as client:
        uploaded = client.files.create(file=path.open("rb"), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h")
        assert batch.endpoint == "/v1/responses" and batch.status == "validating"
        assert client.batches.retrieve(batch.id).endpoint == "/v1/responses"


def test_a_responses_batch_runs_end_to_end(settings, sqlite_instance, tiny_model, loaded_engine):
    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Hi", "annotations": []}]},
                {"role": "user", "content": [{"type": "input_text", "text": "More "},
                                             {"type": "input_text", "text": "please"}]}]
    lines = [
        respond("string", "Tell me about item 1", instructions="Answer briefly"),
        respond("messages", messages),
        respond("cut", "Count to ten", max_output_tokens=5, ignore_eos=True),
        respond("schema", "Answer yes or no", max_output_tokens=40,
                text={"format": {"type": "json_schema", "name": "label", "schema": SCHEMA, "strict": True}}),
        respond("tools", "Hi", tools=[{"type": "function", "name": "lookup", "parameters": {}}]),
        respond("long", "word " * 2000),
        chat_line("chat", "Hello"),  # another endpoint in the same batch still runs: both are generative
        respond("cached", LONG_PROMPT),
    ]
    _, outputs, errors = run_batch(settings, sqlite_instance, tiny_model, lines, batch_id="responses")
    # The same long prompt again, on the same engine: vLLM finds its blocks in the prefix cache.
    _, again, _ = run_batch(settings, sqlite_instance, tiny_model, [respond("cached", LONG_PROMPT)],
                            batch_id="responses-again")
    cached = Response.model_validate(again[0]["response"]["body"]).usage
    assert {e["custom_id"]: e["error"]["code"] for e in errors} == {
        "tools": "invalid_body", "long": "context_length_exceeded"}
    bodies = {k: v["response"]["body"] for k, v in by_id(outputs).items()}
    assert bodies.pop("chat")["object"] == "chat.completion"
    out = {k: Response.model_validate(body) for k, body in bodies.items()}
    assert sorted(out) == ["cached", "cut", "messages", "schema", "string"]
    assert 0 < cached.input_tokens_details.cached_tokens < cached.input_tokens == out["cached"].usage.input_tokens

    tokenizer = loaded_engine.tokenizer
    for response in out.values():
        assert response.object == "response" and response.id.startswith("resp_") and response.model == MODEL_NAME
        assert response.created_at > 0 and response.error is None
        [item] = response.output
        assert item.type == "message" and item.role == "assistant"
        [part] = item.content
        assert part.type == "output_text"
        usage = response.usage
        assert 0 < usage.output_tokens <= (response.max_output_tokens or 0)
        assert usage.total_tokens == usage.input_tokens + usage.output_tokens
        assert usage.output_tokens_details.reasoning_tokens == 0
        assert 0 <= usage.input_tokens_details.cached_tokens <= usage.input_tokens

    # Every turn went through the model's chat template, `instructions` as a system message first.
    def template_tokens(turns: list[dict]) -> int:
        return len(template_ids(tokenizer, turns))

    assert out["string"].usage.input_tokens == template_tokens(
        [{"role": "system", "content": "Answer briefly"}, {"role": "user", "content": "Tell me about item 1"}])
    assert out["messages"].usage.input_tokens == template_tokens(
        [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hello"},
         {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "More please"}])
    assert out["string"].instructions == "Answer briefly" and out["string"].max_output_tokens == 8

    # Hitting max_output_tokens makes the response incomplete, as OpenAI reports it.
    cut = out["cut"]
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 5 and cut.output[0].status == "incomplete"

    schema = out["schema"]
    assert schema.text.format.type == "json_schema" and schema.text.format.name == "label"
    assert schema.status == "completed", schema.output[0].content[0].text  # the grammar closed it within 40 tokens
    assert json.loads(schema.output[0].content[0].text)["label"] in ("yes", "no")
    for key in ("string", "messages"):
        assert out[key].status == "completed" or out[key].usage.output_tokens == 8


def test_cli_submit_queues_a_responses_batch(tmp_path, tiny_model):
    from tests.support.api_stack import Stack, install_instance, stack_env

    offline = Stack(tmp_path, stack_env(tmp_path, tiny_model))  # no daemon: the batch stays queued
    install_instance(offline.env)
    path = write_jsonl(tmp_path / "in.jsonl", [respond("a", "Hi"), respond("b", "Ho")])
    submitted = offline.cli("submit", str(path), "--model", MODEL_NAME, "--json")
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["endpoint"] == RESPONSES_URL
