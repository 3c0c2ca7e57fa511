"""Label Studio down, a wrong token, a rejected config, an import killed halfway: one line, no duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from pydantic import SecretStr

from tests.integrations.curation.conftest import REPO, chat_item, materialize_curation, review_tasks, write_batch


def failure_line(result) -> str:
    from batch_pipeline.entrypoints.local_run import failure_message

    return failure_message(result.all_events)


def test_label_studio_down_or_wrong_token_fails_with_one_line_and_succeeds_on_retry(
        curation_settings, sqlite_instance, label_studio_server, batch_id):
    batch = batch_id("faults")
    root = write_batch(curation_settings, sqlite_instance, batch, "m", [chat_item(f"p{i}", "Prompt", "answer") for i in range(5)])
    output_before = (root / "results" / "output.jsonl").read_bytes()

    down = curation_settings.model_copy(update={"label_studio_url": "http://127.0.0.1:9"})
    result = materialize_curation(down, sqlite_instance, batch, "curation_tasks", raise_on_error=False)
    assert not result.success
    line = failure_line(result)
    assert "\n" not in line and line.startswith("Label Studio at http://127.0.0.1:9 is unreachable")

    wrong = curation_settings.model_copy(update={"label_studio_api_key": SecretStr("not-the-token-123")})
    result = materialize_curation(wrong, sqlite_instance, batch, "curation_tasks", raise_on_error=False)
    line = failure_line(result)
    assert not result.success and "refused the API token (HTTP 401)" in line and "not-the-token-123" not in line

    assert (root / "results" / "output.jsonl").read_bytes() == output_before  # the batch's results are untouched
    assert materialize_curation(curation_settings, sqlite_instance, batch, "curation_tasks").success
    assert len(review_tasks(label_studio_server, batch)) == 5


def test_a_config_label_studio_rejects_is_reported_in_its_words(label_studio_server):
    from integrations.curation.resources import CurationError, LabelStudio

    resource = LabelStudio(url=label_studio_server.url, api_key=label_studio_server.token)
    with pytest.raises(CurationError) as raised:
        bad = '<View><Text name="t" value="$t"/><Choices name="c" toName="t"/></View>'  # a Choices without Choice
        resource.ensure_project(f"bad config {os.getpid()}", bad)
    assert "HTTP 400" in str(raised.value) and "label_config" in str(raised.value)


def test_an_import_killed_halfway_resumes_without_duplicates(curation_settings, sqlite_instance, label_studio_server,
                                                             batch_id, tmp_path):
    batch = batch_id("killed")
    total = 150
    write_batch(curation_settings, sqlite_instance, batch, "m", [chat_item(f"p{i}", f"Prompt {i}", "a") for i in range(total)])
    settings = curation_settings.model_copy(update={"curation_page_size": 2})
    script = tmp_path / "import.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from dagster import DagsterInstance
        from batch_pipeline.domain.settings import Settings
        from pydantic import SecretStr
        from tests.integrations.curation.conftest import materialize_curation
        settings = Settings.model_validate_json({settings.model_dump_json()!r}).model_copy(
            update={{"label_studio_api_key": SecretStr({label_studio_server.token!r})}})
        with DagsterInstance.local_temp(str({str(tmp_path / "dagster")!r})) as instance:
            materialize_curation(settings, instance, {batch!r}, "curation_tasks")
    """))
    process = subprocess.Popen([sys.executable, str(script)], cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(review_tasks(label_studio_server, batch)) < 20:
        assert process.poll() is None and time.monotonic() < deadline, "the import ended before it could be killed"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    halfway = len(review_tasks(label_studio_server, batch))
    assert 20 <= halfway < total

    result = materialize_curation(curation_settings, sqlite_instance, batch, "curation_tasks")
    metadata = result.asset_materializations_for_node("curation_tasks")[0].metadata
    custom_ids = [t.data["custom_id"] for t in review_tasks(label_studio_server, batch)]
    assert len(custom_ids) == total and len(set(custom_ids)) == total
    assert metadata["tasks_already_present"].value == halfway and metadata["tasks_imported"].value == total - halfway
