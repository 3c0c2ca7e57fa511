"""Reviews back from a real Label Studio: annotations.parquet, training.jsonl, quality scores, win rates."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from tests.integrations.curation.conftest import (
    chat_item,
    completion_item,
    materialize_curation,
    responses_item,
    review,
    review_tasks,
    write_batch,
)
from tests.support.files import read_jsonl


def test_training_file_holds_exactly_the_accepted_and_corrected_answers(
        curation_settings, sqlite_instance, label_studio_server, batch_id):
    batch = batch_id("reviewed")
    items = [chat_item(f"q{i}", f"Question {i}?", f"Answer {i}.") for i in range(6)]
    items.append(completion_item("c0", "Two plus two is", " five"))
    # /v1/responses lines: instructions and input are the prompt, the output_text parts the answer.
    items.append(responses_item("r0", "Is ice wet?", "No, it is frozen.", instructions="Be brief."))
    items.append(responses_item("r1", [{"role": "developer", "content": "One word."},
                                       {"role": "user", "content": [{"type": "input_text", "text": "Colour of "},
                                                                    {"type": "input_text", "text": "snow?"}]}],
                                "Blue"))
    write_batch(curation_settings, sqlite_instance, batch, "tiny-llama", items)
    materialize_curation(curation_settings, sqlite_instance, batch, "curation_tasks")
    tasks = {t.data["custom_id"]: t for t in review_tasks(label_studio_server, batch)}
    assert tasks["r0"].data["messages"] == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Is ice wet?"}]
    assert tasks["r0"].data["response"] == "No, it is frozen." and tasks["r0"].data["url"] == "/v1/responses"
    assert tasks["r1"].predictions[0].result[0]["value"]["text"] == ["Blue"]  # pre-fills the answer box
    client = label_studio_server.client()
    client.annotations.create(id=tasks["q0"].id, result=review("accept", 5, "Answer 0."))  # accepted as is
    client.annotations.create(id=tasks["q1"].id, result=review("accept", 4, "A better answer 1."))  # corrected
    client.annotations.create(id=tasks["q2"].id, result=review("reject", 1, "Answer 2."))  # rejected: left out
    client.annotations.create(id=tasks["q3"].id, result=review("reject", 2, "The right answer 3."))  # rejected, corrected
    client.annotations.create(id=tasks["q4"].id, result=review("accept", 5), was_cancelled=True)  # skipped: left out
    client.annotations.create(id=tasks["c0"].id, result=review("reject", 1, " four"))  # completion, corrected
    client.annotations.create(id=tasks["r0"].id, result=review("accept", 5, "No, it is frozen."))  # accepted as is
    client.annotations.create(id=tasks["r1"].id, result=review("reject", 3, "White"))  # responses, corrected
    # q5 is not reviewed.

    result = materialize_curation(curation_settings, sqlite_instance, batch, "curation_annotations")

    root = curation_settings.resolved_data_dir / "batches" / batch / "curation"
    training = read_jsonl(root / "training.jsonl")
    assert sorted(json.dumps(t, sort_keys=True) for t in training) == sorted(json.dumps(t, sort_keys=True) for t in [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Question 0?"},
                      {"role": "assistant", "content": "Answer 0."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Question 1?"},
                      {"role": "assistant", "content": "A better answer 1."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Question 3?"},
                      {"role": "assistant", "content": "The right answer 3."}]},
        {"messages": [{"role": "user", "content": "Two plus two is"}, {"role": "assistant", "content": " four"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is ice wet?"},
                      {"role": "assistant", "content": "No, it is frozen."}]},
        {"messages": [{"role": "developer", "content": "One word."}, {"role": "user", "content": "Colour of snow?"},
                      {"role": "assistant", "content": "White"}]},
    ])
    rows = pq.read_table(root / "annotations.parquet").to_pylist()
    assert sorted(r["custom_id"] for r in rows) == ["c0", "q0", "q1", "q2", "q3", "r0", "r1"]  # a skip is no annotation
    by_id = {r["custom_id"]: r for r in rows}
    assert by_id["q1"]["corrected"] and by_id["q1"]["model_answer"] == "Answer 1." and by_id["q1"]["rating"] == 4
    assert not by_id["q0"]["corrected"] and by_id["q2"]["decision"] == "reject"
    assert all(r["batch_id"] == batch for r in rows)
    assert by_id["r1"]["corrected"] and by_id["r1"]["model_answer"] == "Blue" and not by_id["r0"]["corrected"]

    metadata = result.asset_materializations_for_node("curation_annotations")[0].metadata
    # Seven decided tasks (q4 was skipped): 3 accepted, 4 rejected; q1, q3, c0 and r1 corrected.
    assert metadata["tasks_annotated"].value == 7
    assert metadata["accept_rate"].value == round(3 / 7, 4)
    assert metadata["correction_rate"].value == round(4 / 7, 4)
    assert metadata["mean_rating"].value == round((5 + 4 + 1 + 2 + 1 + 5 + 3) / 7, 4)
    assert metadata["training_examples"].value == 6

    # A reviewer changes their mind; the next export follows.
    (q2,) = [a for a in client.tasks.get(id=tasks["q2"].id).annotations]
    client.annotations.update(id=q2["id"], result=review("accept", 3, "Answer 2."))
    materialize_curation(curation_settings, sqlite_instance, batch, "curation_annotations")
    assert len(read_jsonl(root / "training.jsonl")) == 7


def pick(side: str) -> list[dict]:
    return [{"from_name": "pairwise", "to_name": "answer_left,answer_right", "type": "pairwise",
             "value": {"selected": side}}]


def test_pairwise_comparison_of_two_batches_gives_a_win_rate(curation_settings, sqlite_instance, label_studio_server,
                                                             batch_id):
    old, new = batch_id("model-old"), batch_id("model-new")
    write_batch(curation_settings, sqlite_instance, old, "old-model",
                [chat_item(f"p{i}", f"Prompt {i}", f"old answer {i}") for i in range(10)])
    write_batch(curation_settings, sqlite_instance, new, "new-model",
                [chat_item(f"p{i}", f"Prompt {i}", f"new answer {i}") for i in range(2, 14)])

    config = {"ops": {"curation_compare": {"config": {"compare_with": old}}}}
    result = materialize_curation(curation_settings, sqlite_instance, new, "curation_compare", run_config=config)
    metadata = result.asset_materializations_for_node("curation_compare")[0].metadata
    assert metadata["pairs_selected"].value == 8 and metadata["tasks_imported"].value == 8  # p2..p9 are shared
    again = materialize_curation(curation_settings, sqlite_instance, new, "curation_compare", run_config=config)
    assert again.asset_materializations_for_node("curation_compare")[0].metadata["tasks_imported"].value == 0

    from integrations.curation.resources import LabelStudio, data_filter

    resource = LabelStudio(url=label_studio_server.url, api_key=label_studio_server.token)
    project = resource.find_project("vllm-batch pairwise comparisons")
    pair = "|".join(sorted((old, new)))
    tasks = list(resource.iter_tasks(project, data_filter(kind="pairwise", pair=pair)))
    assert len(tasks) == 8 and {t.data["batch_left"] for t in tasks} == {old, new}  # sides are shuffled
    client = label_studio_server.client()
    # The new model wins 6 of 8.
    for index, task in enumerate(sorted(tasks, key=lambda t: t.data["custom_id"])):
        winner = new if index < 6 else old
        client.annotations.create(id=task.id, result=pick("left" if task.data["batch_left"] == winner else "right"))

    materialize_curation(curation_settings, sqlite_instance, new, "curation_tasks")
    result = materialize_curation(curation_settings, sqlite_instance, new, "curation_annotations")
    metadata = result.asset_materializations_for_node("curation_annotations")[0].metadata
    assert metadata[f"win_rate_vs_{old}"].value == 0.75
    (rate,) = metadata["win_rates"].value
    assert rate["compared"] == 8 and {rate["model_a"], rate["model_b"]} == {"old-model", "new-model"}


def test_no_compare_batch_means_no_pairwise_tasks(curation_settings, sqlite_instance, label_studio_server, batch_id):
    alone = batch_id("alone")
    write_batch(curation_settings, sqlite_instance, alone, "m", [chat_item("p0", "Prompt", "answer")])
    result = materialize_curation(curation_settings, sqlite_instance, alone, "curation_compare")
    assert result.success and result.asset_materializations_for_node("curation_compare") == []
