"""The replay record: a finished batch records how to run it again, and `vllm-batch replay` does, on the real engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetKey

from batch_pipeline.domain.replay import (
    ModelFingerprint,
    ReplayRecord,
    current_platform,
    current_versions,
    differences,
    model_fingerprint,
    public_view,
)
from tests.support.files import REPO, read_jsonl, write_jsonl

MODEL_NAME = "tiny-llama"


def chat(custom_id: str, content: str, **params) -> dict:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 12, **params}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def texts(output_file: Path) -> dict[str, list[str]]:
    return {line["custom_id"]: [choice["message"]["content"] for choice in line["response"]["body"]["choices"]]
            for line in read_jsonl(output_file)}


def replay_cli(settings, *args: str) -> subprocess.CompletedProcess:
    """`vllm-batch replay` in its own process, on the test's data folder and instance, with engine settings in
    its environment that differ from the record's (the record must win)."""
    env = dict(os.environ, VBATCH_HOME=str(REPO), VBATCH_DATA_DIR=str(settings.data_dir),
               DAGSTER_HOME=str(settings.dagster_home), HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
               VBATCH_DTYPE="float32", VBATCH_ENFORCE_EAGER="true", VBATCH_MAX_MODEL_LEN="512",
               VBATCH_MAX_NUM_SEQS="3", VBATCH_SEED="5", VBATCH_CHUNK_SIZE="7")
    return subprocess.run([sys.executable, "-m", "batch_pipeline.entrypoints.cli", "replay", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def run_original(settings, instance, tiny_model: Path, lines: list[dict], batch_id: str) -> Path:
    from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process

    path = write_jsonl(settings.resolved_data_dir.parent / f"{batch_id}.jsonl", lines)
    spec = register_local_batch(settings, instance, path, str(tiny_model), MODEL_NAME, batch_id=batch_id)
    result = run_batch_in_process(settings, instance, spec.batch_id)
    assert result.success, result.error
    return result.paths.output


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_a_finished_batch_replays_to_identical_text(kind, settings, sqlite_instance, tiny_model, loaded_engine):
    from batch_pipeline.entrypoints.api.service import BatchService
    from resources.storage import BatchStorage

    params = {"temperature": 0} if kind == "greedy" else {"temperature": 1.0, "top_p": 0.95}
    lines = [chat(f"{kind}-{i}", f"Write about the number {i}", **params,
                  **({"seed": 100 + i, "n": 2} if kind == "seeded" else {})) for i in range(40)]
    original = run_original(settings, sqlite_instance, tiny_model, lines, kind)
    paths = BatchStorage(data_dir=settings.data_root).batch(kind)
    record = ReplayRecord.model_validate_json(paths.replay_record.read_text())
    assert record.input_sha256 and record.chunk_size == settings.chunk_size == 16
    assert record.model == str(tiny_model) and record.model_fingerprint.kind == "folder"
    assert record.engine_settings["max_model_len"] == 1024 and record.default_seed == 0
    assert record.versions["vllm"] and record.platform.cpu
    # The UI shows it in batch_results' metadata; the API serves it.
    event = sqlite_instance.fetch_materializations(AssetKey("batch_results"), limit=1).records[0]
    assert event.asset_materialization.metadata["replay_record"].value == public_view(record)
    assert BatchService(settings, sqlite_instance).replay_record(kind) == public_view(record)

    replayed = replay_cli(settings, kind, "--json")
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    assert "warning:" not in replayed.stderr  # nothing changed since the batch ran
    summary = json.loads(replayed.stdout[replayed.stdout.index("{"):])
    assert summary["batch_id"] == f"{kind}-replay-1" and summary["completed"] == 40
    first, again = texts(original), texts(Path(summary["output_file"]))
    assert again == first
    if kind == "seeded":  # sampling really sampled: the two choices of a request differ somewhere
        assert any(a != b for a, b in first.values())
    # The replay ran with the recorded settings, not the ones in its environment.
    new_record = ReplayRecord.model_validate_json(
        BatchStorage(data_dir=settings.data_root).batch(f"{kind}-replay-1").replay_record.read_text())
    assert new_record.engine_settings == record.engine_settings and new_record.chunk_size == 16
    assert new_record.input_sha256 == record.input_sha256


def test_replay_warns_of_other_versions_and_strict_refuses(settings, sqlite_instance, tiny_model, loaded_engine):
    from resources.storage import BatchStorage

    run_original(settings, sqlite_instance, tiny_model, [chat("one", "Hello", temperature=0)], "old")
    paths = BatchStorage(data_dir=settings.data_root).batch("old")
    record = ReplayRecord.model_validate_json(paths.replay_record.read_text())
    record.versions["vllm"] = "0.0.1"
    paths.replay_record.write_text(record.model_dump_json())

    refused = replay_cli(settings, "old", "--strict")
    assert refused.returncode == 1
    assert f"warning: vllm is {current_versions()['vllm']} now, was 0.0.1" in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: not replaying batch old with --strict")
    assert not BatchStorage(data_dir=settings.data_root).batch("old-replay-1").spec.exists()

    (settings.resolved_data_dir.parent / "old.jsonl").write_text(json.dumps(chat("one", "Changed")) + "\n")
    changed = replay_cli(settings, "old")
    assert changed.returncode == 1 and "error: the input file" in changed.stderr and "changed since" in changed.stderr


def test_replay_of_an_unfinished_or_unknown_batch_is_one_line(settings, sqlite_instance, tiny_model):
    from batch_pipeline.entrypoints.api.service import BatchRequestError, BatchService
    from batch_pipeline.entrypoints.local_run import register_local_batch

    path = write_jsonl(settings.resolved_data_dir.parent / "queued.jsonl", [chat("one", "Hello")])
    register_local_batch(settings, sqlite_instance, path, str(tiny_model), MODEL_NAME, batch_id="queued")
    result = replay_cli(settings, "queued")
    assert result.returncode == 1 and result.stderr.startswith("error: batch queued has no replay record")
    unknown = replay_cli(settings, "nope")
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: no batch with id 'nope'")
    with pytest.raises(BatchRequestError) as refused:
        BatchService(settings, sqlite_instance).replay_record("queued")
    assert refused.value.code == "batch_not_finished"


def test_model_fingerprint_follows_the_files_not_their_times(tmp_path: Path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 64}')
    weights = folder / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * (5 * 4096))  # 5 MiB: sampled, not read whole
    first = model_fingerprint(str(folder))
    assert first.kind == "folder" and first.files == 2 and first.bytes == weights.stat().st_size + 19

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)  # new mtimes, same files
    os.utime(copy / "model.safetensors", (1, 1))
    assert model_fingerprint(str(copy)).sha256 == first.sha256

    (copy / "config.json").write_text('{"hidden_size": 65}')
    assert model_fingerprint(str(copy)).sha256 != first.sha256
    shutil.copy(folder / "config.json", copy / "config.json")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the middle sample: a fine-tune of the same size shows
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert model_fingerprint(str(copy)).sha256 != first.sha256

    assert model_fingerprint(str(tmp_path / "gone")).kind == "missing"
    assert model_fingerprint("org/some-hub-model").kind == "hub"


def test_differences_name_a_changed_model_and_nothing_else(tmp_path: Path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    record = ReplayRecord(batch_id="b", input_path="x.jsonl", input_sha256="0" * 64, model=str(folder),
                          model_name="m", chunk_size=4, engine_settings={"engine_args": '{"hf_token": "s3cret"}'},
                          engine_kwargs={"hf_token": "s3cret", "seed": 0}, default_seed=0,
                          model_fingerprint=model_fingerprint(str(folder)), versions=current_versions(),
                          platform=current_platform())
    assert differences(record) == []
    (folder / "extra.json").write_text("{}")
    assert differences(record) == [f"the model {folder} changed since the batch ran (its files differ)"]
    # What the UI and the API show never carries a credential-like engine argument.
    assert "s3cret" not in json.dumps(public_view(record))
    assert public_view(record)["engine_kwargs"]["seed"] == 0
    assert ModelFingerprint(kind="missing").sha256 is None
