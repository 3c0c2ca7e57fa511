"""curation_tasks against a real Label Studio: one task per successful request, predictions, no duplicates."""

from __future__ import annotations

import json

from dagster import AssetKey

from integrations.curation.records import CurationStatus
from tests.integrations.curation.conftest import (
    chat_item,
    completion_item,
    failed_item,
    materialize_curation,
    review_tasks,
    write_batch,
)


def mixed_items(count: int) -> list[dict]:
    items = [chat_item(f"chat-{i}", f"Question {i}?", f"Answer {i}.") for i in range(count)]
    items += [completion_item("cmpl-0", "Once upon a time", " there was a batch."), failed_item("failed-0")]
    return items


def test_every_successful_request_becomes_one_task_with_the_answer_as_prediction(
        curation_settings, sqlite_instance, label_studio_server, batch_id):
    tasks_once = batch_id("tasks-once")
    write_batch(curation_settings, sqlite_instance, tasks_once, "tiny-llama", mixed_items(120))

    first = materialize_curation(curation_settings, sqlite_instance, tasks_once, "curation_tasks")
    tasks = review_tasks(label_studio_server, tasks_once)
    assert sorted(t.data["custom_id"] for t in tasks) == sorted([f"chat-{i}" for i in range(120)] + ["cmpl-0"])
    by_id = {t.data["custom_id"]: t for t in tasks}
    chat = by_id["chat-7"]
    assert chat.data["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Question 7?"}]
    assert chat.data["response"] == "Answer 7." and chat.data["batch_id"] == tasks_once
    assert chat.data["model"] == "tiny-llama"
    (prediction,) = chat.predictions
    assert prediction.model_version == f"{tasks_once}:tiny-llama"
    assert prediction.result[0]["value"]["text"] == ["Answer 7."]
    assert by_id["cmpl-0"].data["messages"] == [{"role": "prompt", "content": "Once upon a time"}]
    assert by_id["cmpl-0"].data["response"] == " there was a batch."

    metadata = first.asset_materializations_for_node("curation_tasks")[0].metadata
    assert metadata["tasks_imported"].value == 121 and metadata["tasks_already_present"].value == 0

    # Materialising again imports nothing twice.
    second = materialize_curation(curation_settings, sqlite_instance, tasks_once, "curation_tasks")
    metadata = second.asset_materializations_for_node("curation_tasks")[0].metadata
    assert metadata["tasks_imported"].value == 0 and metadata["tasks_already_present"].value == 121
    assert len(review_tasks(label_studio_server, tasks_once)) == 121
    status = CurationStatus.model_validate_json(
        (curation_settings.resolved_data_dir / f"batches/{tasks_once}/curation/status.json").read_text())
    assert status.tasks_imported == 121 and status.project_id == metadata["project_id"].value
    event = sqlite_instance.get_latest_materialization_event(AssetKey("curation_tasks"))
    assert event.dagster_event.partition == tasks_once
    assert label_studio_server.token not in json.dumps(
        {k: str(v.value) for k, v in metadata.items()})  # the token never reaches metadata


def test_one_project_per_model_holds_several_batches_apart(curation_settings, sqlite_instance, label_studio_server, batch_id):
    per_model_a = batch_id("per-model-a")
    per_model_b = batch_id("per-model-b")
    model = batch_id("shared-model")
    settings = curation_settings.model_copy(update={"curation_project_per": "model"})
    write_batch(settings, sqlite_instance, per_model_a, model, mixed_items(3))
    write_batch(settings, sqlite_instance, per_model_b, model, mixed_items(3))
    a = materialize_curation(settings, sqlite_instance, per_model_a, "curation_tasks")
    b = materialize_curation(settings, sqlite_instance, per_model_b, "curation_tasks")
    project_a = a.asset_materializations_for_node("curation_tasks")[0].metadata["project_id"].value
    project_b = b.asset_materializations_for_node("curation_tasks")[0].metadata["project_id"].value
    assert project_a == project_b
    assert b.asset_materializations_for_node("curation_tasks")[0].metadata["tasks_imported"].value == 4
    titles = [p.title for p in label_studio_server.client().projects.list(page_size=100) if p.id == project_a]
    assert titles == [f"vllm-batch review: {model}"]


def test_a_seeded_sample_picks_the_same_requests_every_time(curation_settings, sqlite_instance, label_studio_server, batch_id):
    sampled = batch_id("sampled")
    settings = curation_settings.model_copy(update={"curation_sample_size": 7, "curation_sample_seed": 3})
    write_batch(settings, sqlite_instance, sampled, "tiny-llama", mixed_items(60))
    materialize_curation(settings, sqlite_instance, sampled, "curation_tasks")
    first = sorted(t.data["custom_id"] for t in review_tasks(label_studio_server, sampled))
    assert len(first) == 7
    result = materialize_curation(settings, sqlite_instance, sampled, "curation_tasks")
    assert result.asset_materializations_for_node("curation_tasks")[0].metadata["tasks_imported"].value == 0
    assert sorted(t.data["custom_id"] for t in review_tasks(label_studio_server, sampled)) == first

    from integrations.curation.selection import Selection, select_for_review
    from resources.storage import BatchStorage

    paths = BatchStorage(data_dir=str(settings.resolved_data_dir)).batch(sampled)
    other_seed = {t.custom_id for t in select_for_review(paths, sampled, "m", Selection(sample_size=7, seed=4))}
    assert other_seed != set(first) and len(other_seed) == 7
    fraction = [t.custom_id for t in select_for_review(paths, sampled, "m", Selection(sample_fraction=0.5, seed=3))]
    assert 15 < len(fraction) < 45  # about half of 61
    assert fraction == [t.custom_id for t in select_for_review(paths, sampled, "m", Selection(sample_fraction=0.5, seed=3))]


def test_only_some_custom_ids_or_only_json_schema_failures(curation_settings, sqlite_instance, label_studio_server, batch_id):
    schema_failures = batch_id("schema-failures")
    some_ids = batch_id("some-ids")
    schema = {"type": "object", "properties": {"label": {"enum": ["yes", "no"]}}, "required": ["label"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "label", "schema": schema}}
    items = [chat_item("ok", "Label it", '{"label": "yes"}', response_format=response_format),
             chat_item("bad-value", "Label it", '{"label": "maybe"}', response_format=response_format),
             chat_item("not-json", "Label it", "yes", response_format=response_format),
             chat_item("free-text", "Say hi", "hi")]
    write_batch(curation_settings, sqlite_instance, schema_failures, "tiny-llama", items)
    settings = curation_settings.model_copy(update={"curation_only_schema_failures": True})
    materialize_curation(settings, sqlite_instance, schema_failures, "curation_tasks")
    tasks = review_tasks(label_studio_server, schema_failures)
    assert sorted(t.data["custom_id"] for t in tasks) == ["bad-value", "not-json"]
    assert all(t.data["schema_failed"] is True for t in tasks)

    write_batch(curation_settings, sqlite_instance, some_ids, "tiny-llama", mixed_items(10))
    settings = curation_settings.model_copy(update={"curation_custom_ids": ["chat-2", "cmpl-0", "failed-0", "nope"]})
    materialize_curation(settings, sqlite_instance, some_ids, "curation_tasks")
    assert sorted(t.data["custom_id"] for t in review_tasks(label_studio_server, some_ids)) == ["chat-2", "cmpl-0"]
