"""`/v1/responses` lines in curation: the prompt the model saw, the answer, the JSON check and the training line
come out as they do for a chat line (no Label Studio needed; test_curation_annotations.py has the round trip)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from openai.types.responses import Response

from batch_pipeline.domain.records import RESPONSES_URL, ResponsesBody
from integrations.curation.annotations import training_example
from integrations.curation.records import AnnotationRecord
from integrations.curation.selection import as_chat_body, iter_reviewable, prompt_messages, response_text, schema_failed
from resources.storage import BatchStorage
from tests.integrations.curation.conftest import chat_item, response_object, responses_item, write_batch

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["yes", "no"]}}, "required": ["label"]}
HISTORY = [{"role": "developer", "content": "Answer in one word."},
           {"role": "user", "content": [{"type": "input_text", "text": "Is water "},
                                        {"type": "input_text", "text": "wet?"}]},
           {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "Yes.", "annotations": []}]},
           {"type": "message", "role": "user", "content": "And ice?"}]


def stored(body: dict) -> dict:
    """The body as batch_input stores it in requests.parquet (validated, nulls left out)."""
    return json.loads(ResponsesBody.model_validate(body).model_dump_json(exclude_none=True, by_alias=True))


def shown(body: dict) -> list[dict]:
    return [m.model_dump() for m in prompt_messages(RESPONSES_URL, as_chat_body(RESPONSES_URL, stored(body)))]


def test_the_prompt_is_instructions_then_input_as_the_engine_sent_them():
    assert shown({"input": "Is water wet?", "instructions": "Be brief."}) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is water wet?"}]
    assert shown({"input": HISTORY}) == [
        {"role": "developer", "content": "Answer in one word."}, {"role": "user", "content": "Is water wet?"},
        {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "And ice?"}]
    # The same turns the chat template got when the line ran.
    assert shown({"input": HISTORY, "instructions": "Be brief."}) == ResponsesBody.model_validate(
        {"input": HISTORY, "instructions": "Be brief."}).messages()


def test_the_answer_is_the_responses_output_text():
    body = response_object("m", "Ice is frozen water.")
    assert response_text(body) == Response.model_validate(body).output_text == "Ice is frozen water."
    # Only message text: other output items and content parts add nothing.
    body["output"][0]["content"].append({"type": "refusal", "refusal": "no"})
    body["output"].insert(0, {"id": "rs_1", "type": "reasoning", "summary": []})
    assert response_text(body) == "Ice is frozen water."


@pytest.mark.parametrize("text, answer, failed", [
    ({"format": {"type": "json_schema", "name": "label", "schema": SCHEMA, "strict": True}}, '{"label": "yes"}', False),
    ({"format": {"type": "json_schema", "name": "label", "schema": SCHEMA}}, '{"label": "maybe"}', True),
    ({"format": {"type": "json_schema", "name": "label", "schema": SCHEMA}}, "yes", True),
    ({"format": {"type": "json_object"}}, "[1]", True),
    ({"format": {"type": "json_object"}}, "{}", False),
    ({"format": {"type": "text"}}, "yes", None),
    (None, "yes", None),
])
def test_text_format_is_checked_as_chats_response_format(text, answer, failed):
    body = stored({"input": "Label it", **({"text": text} if text else {})})
    assert schema_failed(as_chat_body(RESPONSES_URL, body), answer) is failed


def test_a_reviewed_responses_task_is_a_chat_training_line():
    messages = shown({"input": "Is ice wet?", "instructions": "Be brief."})
    task = SimpleNamespace(id=1, data={"messages": messages, "response": "No."})
    final = AnnotationRecord(batch_id="b", custom_id="r", task_id=1, annotation_id=1, annotator=None, decision="reject",
                             rating=2, model_answer="No.", answer="Only when it melts.", corrected=True,
                             was_cancelled=False, created_at=None, updated_at=None)
    example = training_example(task, final)
    assert example is not None and example.model_dump() == {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is ice wet?"},
        {"role": "assistant", "content": "Only when it melts."}]}


def test_a_batch_with_responses_and_chat_lines_is_reviewable_line_by_line(settings, sqlite_instance):
    items = [chat_item("chat", "Is water wet?", "Yes."),
             responses_item("responses", HISTORY, '{"label": "no"}', instructions="Be brief.",
                            text={"format": {"type": "json_schema", "name": "label", "schema": SCHEMA}})]
    write_batch(settings, sqlite_instance, "mixed", "tiny-llama", items)
    paths = BatchStorage(data_dir=str(settings.resolved_data_dir)).batch("mixed")
    tasks = {t.custom_id: t for t in iter_reviewable(paths, "mixed", "tiny-llama")}
    responses = tasks["responses"]
    assert responses.url == RESPONSES_URL and responses.response == '{"label": "no"}'
    assert [m.role for m in responses.messages] == ["system", "developer", "user", "assistant", "user"]
    assert responses.schema_failed is False
    assert tasks["chat"].response == "Yes." and tasks["chat"].schema_failed is None
