"""Faults of a batch's local storage, through real runs on the real engine: checkpoints damaged on disk, a full disk.

A finished chunk file is a checkpoint that a re-run trusts, so it must also be readable before it is trusted:
a damaged one is redone (with a warning naming it), never merged with rows missing. A disk that fills up
mid-batch gives one readable error and publishes no half file; the re-run after space is freed finishes
with every line once.

The full disk is real: a small tmpfs mounted as the data folder (ENOSPC, as a full data disk answers), which
needs root; a file size limit (RLIMIT_FSIZE, EFBIG) in a subprocess needs nothing and checks the same path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batch_pipeline.entrypoints.local_run import BatchRun, register_local_batch, run_batch_in_process
from resources.storage import BatchPaths
from tests.support.files import REPO, read_jsonl, write_jsonl

MODEL_NAME = "tiny-llama"
BATCH = "faults"


def completion(custom_id: str, prompt: str) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 6, "temperature": 0}}


def texts_by_id(paths: BatchPaths) -> dict[str, str]:
    """custom_id -> generated text, failing if an output line's custom_id appears twice."""
    records = read_jsonl(paths.output)
    counts = Counter(record["custom_id"] for record in records)
    assert [cid for cid, n in counts.items() if n > 1] == [], "an output line is duplicated"
    return {record["custom_id"]: record["response"]["body"]["choices"][0]["text"] for record in records}


def run(settings, instance, batch_id: str = BATCH) -> BatchRun:
    return run_batch_in_process(settings, instance, batch_id)


def warnings_of(instance, run: BatchRun) -> list[str]:
    import logging

    return [entry.user_message for entry in instance.all_logs(run.run_id) if entry.level == logging.WARNING]


def register(settings, instance, tmp_path: Path, model: Path, count: int, chunk_size: int) -> list[str]:
    lines = [completion(f"req-{i}", f"Item {i} is") for i in range(count)]
    path = write_jsonl(tmp_path / f"{BATCH}.jsonl", lines)
    register_local_batch(settings, instance, path, str(model), MODEL_NAME, batch_id=BATCH, chunk_size=chunk_size)
    return [line["custom_id"] for line in lines]


def test_damaged_checkpoints_are_redone_with_a_warning_naming_each_file(settings, sqlite_instance, tiny_model,
                                                                       loaded_engine, tmp_path):
    ids = register(settings, sqlite_instance, tmp_path, tiny_model, 36, chunk_size=8)  # chunks of 8, 8, 8, 8, 4
    first = run(settings, sqlite_instance)
    assert first.success, first.error
    expected = texts_by_id(first.paths)
    assert sorted(expected) == sorted(ids)

    paths = first.paths
    chunk = paths.chunk
    chunk(1).write_bytes(chunk(1).read_bytes()[: chunk(1).stat().st_size // 2])  # cut short (a lost tail)
    chunk(2).write_bytes(b"")  # zero bytes (a crash between create and write on a file system without rename)
    chunk(3).write_bytes(os.urandom(chunk(3).stat().st_size))  # garbage of the right size
    shutil.copyfile(chunk(0), chunk(4))  # a whole parquet file, but another chunk's: 8 rows where 4 belong
    shutil.rmtree(paths.results_dir)

    again = run(settings, sqlite_instance)
    assert again.success, again.error
    assert again.summary["chunks_resumed"] == 1 and again.summary["chunks_run"] == 4
    assert texts_by_id(paths) == expected  # every line once, each the same greedy text as before
    assert again.summary["completed"] == 36 and again.summary["failed"] == 0
    warned = warnings_of(sqlite_instance, again)
    for index in (1, 2, 3, 4):
        assert sum(str(chunk(index)) in message and "damaged" in message for message in warned) == 1, warned
    assert not any(str(chunk(0)) in message for message in warned)
    assert [pq.read_metadata(chunk(i)).num_rows for i in range(5)] == [8, 8, 8, 8, 4]


def test_a_chunk_damaged_inside_is_refused_by_the_merge_and_redone_by_the_next_run(
        settings, sqlite_instance, tiny_model, loaded_engine, tmp_path):
    register(settings, sqlite_instance, tmp_path, tiny_model, 24, chunk_size=8)
    first = run(settings, sqlite_instance)
    assert first.success, first.error
    expected = texts_by_id(first.paths)
    shutil.rmtree(first.paths.results_dir)

    # Its footer is intact (rows and columns as expected, so generation trusts it) but a data page is not.
    damaged = first.paths.chunk(1)
    data = bytearray(damaged.read_bytes())
    data[4:200] = b"\xff" * 196
    damaged.write_bytes(bytes(data))
    refused = run(settings, sqlite_instance)
    assert not refused.success
    assert refused.error is not None and str(damaged) in refused.error and "damaged" in refused.error
    assert "run the batch again" in refused.error and "\n" not in refused.error
    assert not damaged.exists(), "the damaged chunk was kept: the next run would trust it again"
    assert not first.paths.output.exists() and not first.paths.summary.exists()

    again = run(settings, sqlite_instance)
    assert again.success, again.error
    assert again.summary["chunks_resumed"] == 2 and again.summary["chunks_run"] == 1
    assert texts_by_id(first.paths) == expected


# ---- a full disk ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs mounted for the test: a real file system that fills up (needs root)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """Write a ballast file until the disk has no byte left; returns it (remove it to free the space)."""
    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as handle:
        for block in (1 << 16, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * block)
    with pytest.raises(OSError) as full:
        (disk / "probe").write_bytes(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    (disk / "probe").unlink(missing_ok=True)
    return ballast


def temporary_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if ".tmp" in path.name]


def test_a_full_disk_mid_batch_is_one_clear_error_and_the_rerun_finishes_with_every_line_once(
        settings, sqlite_instance, tiny_model, loaded_engine, tmp_path, small_disk, at_first_chunk):
    from dagster import materialize

    from assets.batch_results import batch_results
    from batch_pipeline.domain.status import failure_message
    from resources.storage import BatchStorage

    settings = settings.model_copy(update={"data_dir": small_disk})
    ids = register(settings, sqlite_instance, tmp_path, tiny_model, 40, chunk_size=8)
    paths = BatchStorage(data_dir=str(small_disk)).batch(BATCH)

    with at_first_chunk(paths, lambda: fill(small_disk)) as first_written:
        stopped = run(settings, sqlite_instance)
    assert not stopped.success
    assert stopped.error is not None and stopped.error.startswith("no space left to write "), stopped.error
    assert "chunk-" in stopped.error and "run the batch again" in stopped.error and "\n" not in stopped.error
    # Only the chunk written before the disk filled up; no temporary file left, no half chunk published.
    assert len(first_written) == 1 and paths.finished_chunks() == first_written
    assert pq.read_metadata(paths.chunk(first_written.pop())).num_rows == 8
    assert temporary_files(small_disk) == [] and not paths.results_dir.exists()

    (small_disk / "ballast").unlink()
    finished = run(settings, sqlite_instance)
    assert finished.success, finished.error
    assert finished.summary["chunks_resumed"] == 1 and finished.summary["chunks_run"] == 4
    expected = texts_by_id(paths)
    assert sorted(expected) == sorted(ids) and finished.summary["completed"] == 40
    output = paths.output.read_bytes()

    # Full again: a whole re-run stops at the input stage, whose files stay as they were.
    shutil.rmtree(paths.results_dir)
    manifest = paths.manifest.read_bytes()
    ballast = fill(small_disk)
    refused = run(settings, sqlite_instance)
    assert not refused.success and refused.error is not None
    assert refused.error.startswith("no space left to write ") and "/input/" in refused.error, refused.error
    assert paths.manifest.read_bytes() == manifest and pq.read_metadata(paths.requests).num_rows == 40

    # The merge alone on the full disk: no output file, no summary, nothing half written.
    from resources.vllm_engine import VLLMEngine

    # The merge reads the engine's settings for the replay record (it loads nothing).
    resources = {"storage": BatchStorage(data_dir=str(small_disk)),
                 "engine": VLLMEngine(dtype="float32", max_model_len=1024, enforce_eager=True)}
    merge = materialize([batch_results], partition_key=BATCH, instance=sqlite_instance, resources=resources,
                        raise_on_error=False)
    assert not merge.success
    message = failure_message(merge.all_events)
    assert message.startswith("no space left to write ") and "/results/" in message, message
    assert not paths.output.exists() and not paths.summary.exists() and temporary_files(small_disk) == []

    ballast.unlink()
    merged = materialize([batch_results], partition_key=BATCH, instance=sqlite_instance, resources=resources)
    assert merged.success
    assert paths.output.read_bytes() == output


_FILE_SIZE_LIMIT = textwrap.dedent("""
    import json, os, resource, sys
    import pyarrow as pa, pyarrow.parquet as pq
    from resources.storage import BatchStorage, StorageFull, atomic_path
    paths = BatchStorage(data_dir=sys.argv[1]).batch("b1")
    with atomic_path(paths.chunk(0)) as tmp:
        pq.write_table(pa.table({"line": [1, 2, 3]}), tmp)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))  # Python ignores SIGXFSZ: writes get EFBIG
    big = pa.table({"text": [os.urandom(1024).hex() for _ in range(512)]})
    outcomes = {}
    for name, write in (("parquet", lambda tmp: pq.write_table(big, tmp, compression="none")),
                        ("text", lambda tmp: tmp.write_text("x" * (1 << 20)))):
        for target in (paths.chunk(0), paths.chunk(1)):
            try:
                with atomic_path(target) as tmp:
                    write(tmp)
                outcomes[f"{name} {target.name}"] = "published"
            except StorageFull as exc:
                outcomes[f"{name} {target.name}"] = str(exc)
    print(json.dumps(outcomes))
""")


def test_a_file_size_limit_gives_the_same_clear_error_and_keeps_the_published_file(tmp_path):
    import json

    done = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMIT, str(tmp_path / "data")], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    outcomes = json.loads(done.stdout)
    paths = BatchPaths(tmp_path / "data" / "batches" / "b1")
    assert len(outcomes) == 4
    for attempt, outcome in outcomes.items():
        target = paths.chunk(0) if attempt.endswith("chunk-000000.parquet") else paths.chunk(1)
        assert outcome.startswith(f"no space left to write {target} (File too large)"), (attempt, outcome)
    assert pq.read_table(paths.chunk(0)).column("line").to_pylist() == [1, 2, 3]  # the earlier file, whole
    assert not paths.chunk(1).exists() and temporary_files(tmp_path) == []
