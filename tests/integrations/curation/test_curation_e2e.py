"""A real batch through the tiny model -> review tasks in Label Studio -> reviews -> training.jsonl."""

from __future__ import annotations

from openai.types.responses import Response
from pydantic import SecretStr

from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process
from tests.integrations.curation.conftest import materialize_curation, review, review_tasks
from tests.support.files import read_jsonl, write_jsonl


def test_batch_to_review_to_training_file(settings, sqlite_instance, tiny_model, loaded_engine, label_studio_server,
                                          batch_id):
    settings = settings.model_copy(update={
        "enable_curation": True, "label_studio_url": label_studio_server.url,
        "label_studio_api_key": SecretStr(label_studio_server.token), "curation_project_per": "batch"})
    batch = batch_id("e2e")
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny-llama", "messages": [{"role": "user", "content": f"Item {i}"}],
                       "max_tokens": 6, "temperature": 0}} for i in range(12)]
    lines.append({"custom_id": "resp", "method": "POST", "url": "/v1/responses",
                  "body": {"model": "tiny-llama", "input": "Item R", "instructions": "Be brief.",
                           "max_output_tokens": 6, "temperature": 0, "ignore_eos": True}})
    path = write_jsonl(settings.resolved_data_dir.parent / "e2e.jsonl", lines)
    register_local_batch(settings, sqlite_instance, path, str(tiny_model), "tiny-llama", batch_id=batch)
    run = run_batch_in_process(settings, sqlite_instance, batch)  # batch_job, then the integrations in-process
    assert run.success and run.integration_error is None, (run.error, run.integration_error)

    tasks = {t.data["custom_id"]: t for t in review_tasks(label_studio_server, batch)}
    assert sorted(tasks) == sorted([f"r{i}" for i in range(12)] + ["resp"])
    bodies = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(run.paths.output)}
    answers = {cid: Response.model_validate(body).output_text if body["object"] == "response"
               else body["choices"][0]["message"]["content"] for cid, body in bodies.items()}
    assert all(tasks[cid].data["response"] == answers[cid] for cid in tasks) and answers["resp"]
    assert tasks["resp"].data["messages"] == [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Item R"}]

    client = label_studio_server.client()
    client.annotations.create(id=tasks["r0"].id, result=review("accept", 5, answers["r0"]))
    client.annotations.create(id=tasks["r1"].id, result=review("reject", 2, "A corrected answer."))
    client.annotations.create(id=tasks["r2"].id, result=review("reject", 1, answers["r2"]))
    client.annotations.create(id=tasks["resp"].id, result=review("accept", 4, answers["resp"]))
    materialize_curation(settings, sqlite_instance, batch, "curation_annotations")

    training = read_jsonl(run.paths.root / "curation" / "training.jsonl")
    assert sorted((t["messages"][-2]["content"], t["messages"][-1]["content"]) for t in training) == sorted([
        ("Item 0", answers["r0"]), ("Item 1", "A corrected answer."), ("Item R", answers["resp"])])
    [responses_line] = [t for t in training if t["messages"][-2]["content"] == "Item R"]
    assert [m["role"] for m in responses_line["messages"]] == ["system", "user", "assistant"]
