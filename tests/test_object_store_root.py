"""The data root on an object store: VBATCH_DATA_DIR=s3://bucket/prefix (SeaweedFS) and gs://... (fake-gcs-server).

A batch runs end to end through the real engine with its files on the S3-compatible server and gives
the same output and error files as the same batch on a local folder. A chunk is published whole or not
at all: a writer killed mid-chunk leaves no chunk object, and temporary-looking objects never count.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_pipeline.domain.queue_tickets import clear_ticket, pending_tickets
from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process
from resources.storage import BatchPaths, BatchStorage, atomic_path, location, read_parquet
from tests.support.files import REPO, write_jsonl

MODEL_NAME = "tiny-llama"


@pytest.fixture
def s3_root(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on SeaweedFS; returns s3://bucket/prefix. The endpoint comes from AWS_ENDPOINT_URL,
    as a deployment on an S3-compatible store would set it."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    bucket = f"vbatch-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/team-a/batches-root"


def _lines() -> list:
    lines = [{"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"Tell me about item {i}"}],
                       "max_tokens": 6, "temperature": 0}} for i in range(40)]
    lines.insert(7, "this line is not JSON")
    return lines


def _run(settings, instance, tiny_model: Path, input_path: Path):
    spec = register_local_batch(settings, instance, input_path, str(tiny_model), MODEL_NAME, batch_id="b1")
    result = run_batch_in_process(settings, instance, spec.batch_id)
    assert result.success, result.error
    return result


def _comparable(text: str) -> list[dict]:
    """Output or error lines without what differs between two runs of one batch (response and completion
    ids, `created`, prefix-cache hits); line ids, custom_ids, statuses, texts and token counts stay."""
    records = []
    for line in text.splitlines():
        record = json.loads(line)
        if record["response"] is not None:
            record["response"].pop("request_id")
            body = record["response"]["body"]
            body.pop("id"), body.pop("created")
            body["usage"].pop("prompt_tokens_details", None)
        records.append(record)
    return records


def _object_keys(root: str) -> list[str]:
    base = location(root)
    return sorted(base.fs.find(base.path))


def test_a_batch_on_s3_gives_the_local_run_s_results_and_a_lost_chunk_is_redone(
        settings, sqlite_instance, tiny_model, loaded_engine, s3_root, tmp_path):
    input_path = write_jsonl(tmp_path / "requests.jsonl", _lines())
    local = _run(settings, sqlite_instance, tiny_model, input_path)

    s3_settings = settings.model_copy(update={"data_dir": s3_root})
    assert s3_settings.data_root == s3_root
    # The local data folder of an object-store root is HOME/data: the checkout's, which may hold a user's
    # batches (`make demo`). The run must add nothing there.
    local_batches = s3_settings.resolved_data_dir / "batches"
    before = sorted(local_batches.rglob("*")) if local_batches.exists() else []
    with_s3 = _run(s3_settings, sqlite_instance, tiny_model, input_path)

    # Every file of the batch is on the object store, none on the local disk.
    keys = _object_keys(s3_root)
    prefix = s3_root.removeprefix("s3://") + "/batches/b1/"
    assert {key.removeprefix(prefix) for key in keys} == {
        "batch.json", "input/source.jsonl", "input/requests.parquet", "input/invalid.jsonl", "input/manifest.json",
        "chunks/chunk-000000.parquet", "chunks/chunk-000001.parquet", "chunks/chunk-000002.parquet",
        "results/output.jsonl", "results/errors.jsonl", "results/results.parquet", "results/summary.json",
        "results/replay.json"}
    assert (sorted(local_batches.rglob("*")) if local_batches.exists() else []) == before
    assert str(with_s3.paths.output).startswith("s3://")
    assert with_s3.summary["output_file"] == f"{s3_root}/batches/b1/results/output.jsonl"

    # The same lines in the same order: ids, texts (temperature 0), token counts, the bad line's error.
    expected = _comparable(local.paths.output.read_text())
    assert _comparable(with_s3.paths.output.read_text()) == expected and len(expected) == 40
    assert with_s3.paths.errors.read_text() == local.paths.errors.read_text()
    assert with_s3.summary["completed"] == 40 and with_s3.summary["failed"] == 1
    columns = ["line", "id", "custom_id", "error", "prompt_tokens", "completion_tokens"]
    assert (read_parquet(with_s3.paths.results_parquet, columns).to_pylist()
            == read_parquet(local.paths.results_parquet, columns).to_pylist())

    # A writer killed mid-chunk: chunk 1 is gone and only temporary objects lie in its place.
    paths = with_s3.paths
    chunk_1 = paths.chunk(1)
    partial = chunk_1.read_bytes()[:100]
    chunk_1.unlink()
    (paths.chunks_dir / f".{chunk_1.name}.tmp-4242").write_bytes(partial)
    (paths.chunks_dir / f"{chunk_1.name}.tmp").write_bytes(partial)
    assert paths.finished_chunks() == {0, 2}

    again = _run(s3_settings, sqlite_instance, tiny_model, input_path)
    assert again.summary["chunks_resumed"] == 2 and again.summary["chunks_run"] == 1
    assert _comparable(again.paths.output.read_text()) == expected
    assert again.paths.errors.read_text() == local.paths.errors.read_text()


def test_the_input_stage_validates_an_uploaded_file_on_s3(settings, sqlite_instance, tiny_model, s3_root, tmp_path):
    from dagster import materialize

    from assets.batch_input import batch_input
    from batch_pipeline.domain.chunks import iter_requests

    s3_settings = settings.model_copy(update={"data_dir": s3_root})
    input_path = write_jsonl(tmp_path / "requests.jsonl", _lines())
    spec = register_local_batch(s3_settings, sqlite_instance, input_path, str(tiny_model), MODEL_NAME, batch_id="b1")
    assert spec.input_path == "input/source.jsonl"  # the file travelled with the batch
    input_path.unlink()  # a run on another host never sees the submitter's disk
    result = materialize([batch_input], partition_key="b1", instance=sqlite_instance,
                         resources={"storage": BatchStorage(data_dir=s3_root)})
    assert result.success
    paths = BatchStorage(data_dir=s3_root).batch("b1")
    rows = list(iter_requests(paths, 16, skip={1}))
    assert [position for position, _ in rows] == list(range(16)) + list(range(32, 40))
    assert rows[7][1]["custom_id"] == "chat-7" and rows[7][1]["line"] == 9  # line 8 was the bad one
    assert '"line":8' in paths.invalid.read_text()


_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import pyarrow as pa, pyarrow.parquet as pq
    from resources.storage import BatchStorage, atomic_path
    paths = BatchStorage(data_dir=sys.argv[1]).batch("b1")
    with atomic_path(paths.chunk(5)) as tmp:
        pq.write_table(pa.table({"line": list(range(1000))}), tmp)
        print("written", flush=True)
        time.sleep(600)  # killed here, before the publish
""")


def test_a_writer_killed_before_it_publishes_leaves_no_chunk_object(s3_root):
    paths = BatchStorage(data_dir=s3_root).batch("b1")
    with atomic_path(paths.chunk(0)) as tmp:
        pq.write_table(pa.table({"line": [1, 2]}), tmp)
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, s3_root], cwd=REPO, env=os.environ.copy(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "written"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert not paths.chunk(5).exists()
    assert paths.finished_chunks() == {0}
    assert [key.rsplit("/", 1)[-1] for key in _object_keys(s3_root)] == ["chunk-000000.parquet"]


def test_a_failed_write_publishes_nothing(s3_root):
    paths = BatchStorage(data_dir=s3_root).batch("b1")
    with pytest.raises(RuntimeError), atomic_path(paths.summary) as tmp:
        tmp.write_text("{half")
        raise RuntimeError("the writer failed")
    assert not paths.summary.exists()
    assert _object_keys(s3_root) == []


def test_queue_tickets_live_on_the_object_store(s3_root):
    from batch_pipeline.domain.batches import BatchSpec
    from batch_pipeline.domain.queue_tickets import enqueue, set_aside, ticket_exists

    root = location(s3_root)
    spec = BatchSpec(batch_id="b1", input_path="input/source.jsonl", model="m", model_name="m", chunk_size=4)
    first, second = enqueue(root, spec), enqueue(root, spec)
    # Oldest first to the store's mtime resolution (a second on S3); the sensor launches them all at once.
    assert sorted(t["ticket"] for t in pending_tickets(root)) == sorted([first, second])
    clear_ticket(root, first)
    set_aside(root, second, "no partition")
    assert pending_tickets(root) == [] and not ticket_exists(root, second)
    assert (root / "queue" / "set-aside" / f"{second}.json").exists()


def test_a_data_root_on_the_gcs_emulator_publishes_and_lists_chunks(gcs_server, monkeypatch):
    import gcsfs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    bucket = f"vbatch-{uuid.uuid4().hex[:10]}"
    gcsfs.GCSFileSystem(token="anon").mkdir(bucket)
    paths: BatchPaths = BatchStorage(data_dir=f"gs://{bucket}/prefix").batch("b1")
    with atomic_path(paths.chunk(3)) as tmp:
        pq.write_table(pa.table({"line": [3, 1, 2]}), tmp)
    with pytest.raises(RuntimeError), atomic_path(paths.chunk(4)) as tmp:
        pq.write_table(pa.table({"line": [9]}), tmp)
        raise RuntimeError("killed")
    (paths.chunks_dir / ".chunk-000005.parquet.tmp-1").write_bytes(b"PAR1")
    assert paths.finished_chunks() == {3}
    assert read_parquet(paths.chunk(3)).column("line").to_pylist() == [3, 1, 2]


def test_a_uri_data_root_is_checked_and_keeps_host_state_local(tmp_path):
    from pydantic import ValidationError

    from batch_pipeline.domain.settings import Settings

    settings = Settings(home=tmp_path, data_dir="s3://bucket/prefix/")
    assert settings.data_root == "s3://bucket/prefix"
    assert settings.resolved_data_dir == (tmp_path / "data").resolve()  # engine host, metrics, inbox, uploads
    local = Settings(home=tmp_path, data_dir=str(tmp_path / "d"))
    assert local.data_root == str(tmp_path / "d") and isinstance(location(local.data_root), Path)
    with pytest.raises(ValidationError, match="s3://bucket/prefix or gs://bucket/prefix"):
        Settings(home=tmp_path, data_dir="ftp://host/x")


def test_integrations_that_read_local_result_files_refuse_a_uri_data_root(tmp_path):
    from batch_pipeline.domain.settings import Settings
    from batch_pipeline.orchestration.enabled_integrations import IntegrationError, check_integrations

    for flags in ({"enable_curation": True}, {"result_handlers": ["s3"], "s3_bucket": "b"}):
        with pytest.raises(IntegrationError, match="does not work with VBATCH_DATA_DIR=s3://bucket/prefix"):
            check_integrations(Settings(home=tmp_path, data_dir="s3://bucket/prefix", **flags))
    check_integrations(Settings(home=tmp_path, data_dir="s3://bucket/prefix"))
    check_integrations(Settings(home=tmp_path, data_dir=tmp_path / "data", enable_curation=True))


@pytest.fixture
def gcs_root(gcs_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on fake-gcs-server; returns gs://bucket/prefix."""
    import gcsfs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    bucket = f"vbatch-{uuid.uuid4().hex[:10]}"
    gcsfs.GCSFileSystem(token="anon").mkdir(bucket)
    return f"gs://{bucket}/team-a/batches-root"


def _write(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@pytest.mark.parametrize("root_kind", ["local", "s3", "gcs"])
def test_the_expiry_sweep_deletes_expired_results_on_every_root_and_survives_dying_halfway(
        root_kind, request, tmp_path, monkeypatch):
    import batch_pipeline.entrypoints.api.files as files_module
    from batch_pipeline.entrypoints.api.files import FileExpired, FileStore, result_file_id

    local = tmp_path / "data"
    data_root = {"local": str(local), "s3": None, "gcs": None}[root_kind] or request.getfixturevalue(f"{root_kind}_root")
    root = location(data_root)
    storage = BatchStorage(data_dir=data_root)
    store = FileStore(local)
    done, running = storage.batch("b1").results_dir, storage.batch("b2").results_dir
    _write(done / "output.jsonl", "out\n")
    _write(done / "errors.jsonl", "err\n")
    _write(running / "output.jsonl", "keep\n")
    # Outside the data root (one a sibling prefix that only shares the root's name as a string prefix):
    # never deleted, even when a record says it expired.
    outside = [location(data_root + "-old") / "output.jsonl", location(data_root).parent / "elsewhere.jsonl"]
    for path in outside:
        _write(path, "not ours\n")
    store.register_result("b1", "output", done / "output.jsonl", None, expires_after=3600)
    store.register_result("b1", "errors", done / "errors.jsonl", None, expires_after=3600)
    store.register_result("b2", "output", running / "output.jsonl", None, expires_after=2 * 86400)
    for i, path in enumerate(outside):
        store.register_path(result_file_id(f"x{i}", "input"), path, "x.jsonl", "batch", f"x{i}", None, 3600)
    due = sorted([result_file_id("b1", "output"), result_file_id("b1", "errors")]
                 + [result_file_id(f"x{i}", "input") for i in range(len(outside))])
    now = max(store.get(file_id).file.expires_at or 0 for file_id in due) + 1
    roots = [local, root]

    # The sweep dies (SIGKILL-like: not an Exception) right after deleting the first object it deletes.
    real_remove = files_module.remove_file
    removed = []

    def dies_after_one(path):
        real_remove(path)
        removed.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(files_module, "remove_file", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        store.expire_due(roots, now)
    monkeypatch.setattr(files_module, "remove_file", real_remove)
    assert len(removed) == 1 and not removed[0].exists()

    assert sorted(store.expire_due(roots, now)) == due  # again: the object already gone is no error
    assert not (done / "output.jsonl").exists() and not (done / "errors.jsonl").exists()
    assert (running / "output.jsonl").read_text() == "keep\n"  # not due: kept
    assert [path.read_text() for path in outside] == ["not ours\n"] * len(outside)
    for file_id in due:
        with pytest.raises(FileExpired):
            store.get(file_id)
    assert store.expire_due(roots, now) == []  # a third sweep finds nothing left to do
    assert store.get(result_file_id("b2", "output")).file.bytes == 5


def test_the_api_s_sweep_deletes_an_expired_output_object_on_an_s3_data_root(s3_root, sqlite_instance, tmp_path):
    from batch_pipeline.domain.settings import Settings
    from batch_pipeline.entrypoints.api.files import result_file_id
    from batch_pipeline.entrypoints.api.service import BatchService

    service = BatchService(Settings(home=tmp_path, data_dir=s3_root), sqlite_instance)
    output = BatchStorage(data_dir=s3_root).batch("b1").output
    _write(output, "out\n")
    file_id = service.files.register_result("b1", "output", output, None, expires_after=1)
    expires_at = service.files.get(file_id, now=0).file.expires_at
    assert file_id == result_file_id("b1", "output") and expires_at is not None

    def swept() -> bool:
        return service.expire_files() == [file_id]

    deadline = time.monotonic() + 30  # the object's mtime is whole seconds on S3: due within 2 s
    while not swept():
        assert time.monotonic() < deadline, "the file never expired"
        time.sleep(0.2)
    assert not output.exists()
    assert (service.settings.resolved_data_dir / "files" / file_id / "expired").read_text() == str(expires_at)


def test_the_api_serves_a_result_file_that_lives_on_an_s3_data_root(s3_root, settings, tmp_path):
    from fastapi.testclient import TestClient
    from openai import OpenAI
    from pydantic import SecretStr

    from batch_pipeline.entrypoints.api.app import create_app

    # An admin key: the result file registered here has no owner (as one of `vllm-batch submit`).
    api_settings = settings.model_copy(update={"data_dir": s3_root, "admin_api_keys": SecretStr("k-test")})
    output = BatchStorage(data_dir=s3_root).batch("b1").output
    body = "".join(f'{{"custom_id": "c{i}", "ünïcode": true}}\n' for i in range(50_000)).encode()
    _write(output, body.decode())
    with TestClient(create_app(api_settings)) as http, \
            OpenAI(base_url="http://testserver/v1", api_key="k-test", http_client=http, max_retries=0) as client:
        file_id = http.app.state.service.files.register_result("b1", "output", output, None)  # type: ignore[attr-defined]
        assert client.files.retrieve(file_id).bytes == len(body)
        downloaded = client.files.content(file_id)
        assert downloaded.content == body
        assert downloaded.response.headers["content-disposition"] == 'attachment; filename="b1_output.jsonl"'


def test_the_response_cache_lives_on_the_object_store_and_stays_bounded(s3_root):
    import hashlib

    from resources.response_cache import CacheEntry, ResponseCache

    def key(number: int) -> str:
        return hashlib.sha256(str(number).encode()).hexdigest()

    writer = ResponseCache(data_dir=s3_root, enabled=True)
    for segment in range(5):  # the fifth store merges four segments of each shard it touches
        writer.store([CacheEntry(key(n), f'{{"n":{n}}}', 1, 2) for n in range(segment * 40, segment * 40 + 40)])
    reader = ResponseCache(data_dir=s3_root, enabled=True)  # another host: sees what the first one wrote
    found = reader.lookup([key(n) for n in range(200)] + [key(-1)])
    assert len(found) == 200 and found[key(7)].body == '{"n":7}'
    assert all(path.startswith(s3_root.removeprefix("s3://") + "/response-cache/v1/") for path in _object_keys(s3_root))
    bounded = reader.model_copy(update={"max_bytes": 0})
    assert bounded.evict() > 0 and bounded.size() == 0 and bounded.lookup([key(7)]) == {}
