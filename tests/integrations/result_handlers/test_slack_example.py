"""The example Slack handler, installed as a package and found through its entry point, against a local receiver."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.files import REPO

EXAMPLE = REPO / "examples" / "integrations" / "slack_notifications"


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> Path:
    """`pip install` of the example into a folder of its own: real package metadata, real entry point."""
    target = tmp_path_factory.mktemp("slack-example")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(EXAMPLE)], check=True, capture_output=True)
    return target


@pytest.fixture
def slack_receiver():
    """A Slack-compatible incoming webhook: records each JSON message; answers `ok` like Slack does."""
    posts: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            posts.append({"path": self.path, "body": json.loads(self.rfile.read(int(self.headers["content-length"])))})
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/services/T000/B000/XXXX", posts
    server.shutdown()


def test_slack_handler_runs_from_its_entry_point_and_posts_once(settings, sqlite_instance, finished_batch,
                                                                installed_example, slack_receiver, monkeypatch,
                                                                materialize_handler):
    import importlib.metadata

    url, posts = slack_receiver
    monkeypatch.syspath_prepend(str(installed_example))
    [point] = [p for p in importlib.metadata.entry_points(group="vllm_batch.result_handlers") if p.name == "slack"]
    assert point.value == "slack_notifications.handler:SlackHandler"
    monkeypatch.setenv("VBATCH_SLACK_WEBHOOK_URL", url)
    finished_batch("slack-1")

    result = materialize_handler(settings, sqlite_instance, "slack-1", result_handlers=["slack"])
    assert result.success
    [post] = posts
    assert post["path"] == "/services/T000/B000/XXXX"
    assert "Batch slack-1 finished on tiny: 3 of 4 requests completed, 1 failed" in post["body"]["text"]
    assert "team=search" in post["body"]["text"]
    [event] = result.get_asset_materialization_events()
    assert event.asset_key.to_user_string() == "deliver_slack"
    assert "XXXX" not in json.dumps({k: str(v.value) for k, v in event.materialization.metadata.items()})

    assert materialize_handler(settings, sqlite_instance, "slack-1", result_handlers=["slack"]).success
    assert len(posts) == 1, "a re-run of an announced batch posts nothing"


def test_an_unknown_handler_name_is_one_line(settings):
    from batch_pipeline.orchestration.enabled_integrations import IntegrationError, check_integrations

    with pytest.raises(IntegrationError, match="no result handler named 'nope'.*vllm_batch.result_handlers"):
        check_integrations(settings.model_copy(update={"result_handlers": ["nope"]}))
