"""The response cache across batches: on the real CPU engine (tiny model), and its files on their own."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai.types import Batch as OpenAIBatch

from batch_pipeline.domain.intake import register
from batch_pipeline.domain.models import ServedModel
from batch_pipeline.domain.response_reuse import cacheable
from batch_pipeline.domain.status import ChunkStats, derive_batch, read_facts
from batch_pipeline.entrypoints.local_run import run_batch_in_process
from resources.response_cache import CacheEntry, ResponseCache
from resources.vllm_engine import VLLMEngine
from tests.support.files import REPO, read_jsonl, write_jsonl

MODEL_NAME = "tiny-llama"


def chat(custom_id: str, content: str, **params) -> dict:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, **params}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def completion(custom_id: str, prompt: str, **params) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, **params}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


@pytest.fixture
def cached_settings(settings):
    return settings.model_copy(update={"response_cache": True})


def run(settings, instance, tiny_model: Path, lines: list, batch_id: str, metadata: dict | None = None):
    """Register and run one batch in this process; (summary, output lines by custom_id, the Batch object)."""
    path = write_jsonl(settings.resolved_data_dir.parent / f"{batch_id}.jsonl", lines)
    spec = register(settings, instance, path, ServedModel(MODEL_NAME, str(tiny_model)), source="cli",
                    batch_id=batch_id, metadata=metadata)
    result = run_batch_in_process(settings, instance, spec.batch_id)
    assert result.success, result.error
    facts = read_facts(instance, result.paths, settings.resolved_data_dir, ChunkStats())
    outputs = {line["custom_id"]: line for line in read_jsonl(result.paths.output)}
    return result.summary, outputs, derive_batch(facts, time.time())


def without_ids(line: dict) -> dict:
    body = dict(line["response"]["body"])
    for name in ("id", "created"):
        body.pop(name)
    return body


def test_deterministic_lines_are_answered_from_the_cache_and_others_are_not(cached_settings, sqlite_instance,
                                                                           tiny_model, loaded_engine):
    lines = [
        chat("greedy", "Tell me about cats"),
        chat("seeded", "Tell me about dogs", temperature=0.9, seed=3),
        completion("completion", "Birds are"),
        chat("sampled", "Tell me about fish", temperature=0.9),
        chat("two-choices", "Tell me about owls", n=2, temperature=0.9, seed=3),  # seeded, but n > 1
        chat("opted-out", "Tell me about bees", response_cache=False),
    ]
    first, first_out, first_batch = run(cached_settings, sqlite_instance, tiny_model, lines, "first")
    assert first["from_cache"] == 0 and first_batch.requests_from_cache == 0

    changed = [*lines, chat("changed", "Tell me about cats!")]
    second, second_out, batch = run(cached_settings, sqlite_instance, tiny_model, changed, "second")

    assert second["from_cache"] == 3 and second["requests_from_cache"] == 3
    assert batch.requests_from_cache == 3 and batch.request_counts.completed == 7
    OpenAIBatch.model_validate(batch.model_dump())  # the extension field keeps it an OpenAI Batch object
    for custom_id in ("greedy", "seeded", "completion"):
        old, new = first_out[custom_id], second_out[custom_id]
        assert without_ids(new) == without_ids(old)  # the same answer ...
        assert new["response"]["body"]["id"] != old["response"]["body"]["id"]  # ... as a new response object
        assert new["id"] != old["id"] and new["response"]["request_id"] != old["response"]["request_id"]
    assert second_out["greedy"]["response"]["body"]["id"].startswith("chatcmpl-")
    assert second_out["completion"]["response"]["body"]["id"].startswith("cmpl-")
    # The changed line went to the engine; the greedy and seeded answers were reused, not regenerated.
    assert second_out["changed"]["response"]["body"]["choices"][0]["message"]["content"]


def test_a_batch_opted_out_neither_reads_nor_writes_the_cache(cached_settings, sqlite_instance, tiny_model,
                                                             loaded_engine):
    lines = [chat(f"q{i}", f"Question {i}") for i in range(5)]
    opted_out = {"vbatch_response_cache": "false"}
    run(cached_settings, sqlite_instance, tiny_model, lines, "a", metadata=opted_out)
    summary, _, _ = run(cached_settings, sqlite_instance, tiny_model, lines, "b")
    assert summary["from_cache"] == 0  # "a" stored nothing
    summary, _, batch = run(cached_settings, sqlite_instance, tiny_model, lines, "c", metadata=opted_out)
    assert summary["from_cache"] == 0 and batch.requests_from_cache == 0  # "b" stored them; "c" did not look
    summary, _, _ = run(cached_settings, sqlite_instance, tiny_model, lines, "d")
    assert summary["from_cache"] == 5


def test_the_cache_is_off_unless_the_instance_turns_it_on(settings, sqlite_instance, tiny_model, loaded_engine):
    lines = [chat(f"q{i}", f"Question {i}") for i in range(3)]
    run(settings, sqlite_instance, tiny_model, lines, "a")
    summary, _, _ = run(settings, sqlite_instance, tiny_model, lines, "b")
    assert summary["from_cache"] == 0
    assert not (settings.resolved_data_dir / "response-cache").exists()


def test_cacheable_requests_are_the_deterministic_ones():
    url = "/v1/chat/completions"
    assert cacheable(url, {"temperature": 0})
    assert cacheable(url, {"temperature": 1.2, "seed": 0})
    assert cacheable(url, {"seed": 5})
    assert not cacheable(url, {})  # OpenAI's default temperature is 1: sampled
    assert not cacheable(url, {"temperature": 0.7})
    assert not cacheable(url, {"temperature": 0, "n": 2})
    assert not cacheable(url, {"temperature": 0, "response_cache": False})
    assert not cacheable("/v1/embeddings", {"temperature": 0})


def key(number: int) -> str:
    return hashlib.sha256(str(number).encode()).hexdigest()


def test_cache_files_merge_by_tier_and_lookups_find_every_entry(tmp_path):
    cache = ResponseCache(data_dir=str(tmp_path), enabled=True)
    for segment in range(12):
        cache.store([CacheEntry(key(n), json.dumps({"n": n}), 1, 2) for n in range(segment * 50, segment * 50 + 50)])
    found = cache.lookup([key(n) for n in range(600)] + [key(-1)])
    assert len(found) == 600 and json.loads(found[key(42)].body) == {"n": 42}
    for shard in (tmp_path / "response-cache" / "v1").iterdir():
        levels = [name.split("-")[1] for name in os.listdir(shard)]
        assert all(levels.count(level) < 4 for level in set(levels)), levels  # four of a level were merged


def test_the_size_bound_evicts_the_oldest_segments_first(tmp_path):
    cache = ResponseCache(data_dir=str(tmp_path), enabled=True)
    cache.store([CacheEntry(key(n), "x" * 2000, 1, 2) for n in range(100)])
    old_size = cache.size()
    time.sleep(0.01)  # the next segments are named for a later millisecond
    cache.store([CacheEntry(key(n), "y" * 2000, 1, 2) for n in range(100, 200)])
    bounded = cache.model_copy(update={"max_bytes": cache.size() - old_size})
    assert bounded.evict() >= old_size - 100
    assert bounded.size() <= bounded.max_bytes
    assert bounded.lookup([key(n) for n in range(100)]) == {}  # the older store is gone ...
    assert len(bounded.lookup([key(n) for n in range(100, 200)])) == 100  # ... the newer one is whole


def test_an_all_cached_batch_loads_no_engine_through_vllm_batch_run_in_a_new_process(
        cached_settings, sqlite_instance, tiny_model, loaded_engine):
    lines = [chat(f"q{i}", f"Question number {i}") for i in range(20)]
    _, first_out, _ = run(cached_settings, sqlite_instance, tiny_model, lines, "warm")
    path = write_jsonl(cached_settings.resolved_data_dir.parent / "again.jsonl", lines)
    env = dict(os.environ, VBATCH_HOME=str(REPO), VBATCH_DATA_DIR=str(cached_settings.resolved_data_dir),
               DAGSTER_HOME=str(cached_settings.resolved_dagster_home), VBATCH_DTYPE="float32",
               VBATCH_MAX_MODEL_LEN="1024", VBATCH_CHUNK_SIZE="16", VBATCH_RESPONSE_CACHE="true")
    proc = subprocess.run([sys.executable, "-m", "batch_pipeline.entrypoints.cli", "run", str(path), "--model",
                           str(tiny_model), "--model-name", MODEL_NAME, "--batch-id", "again", "--json"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["from_cache"] == 20 and summary["completed"] == 20
    assert summary["engines_loaded_in_process"] == 0 and summary["engine_load_seconds"] == 0
    again = {line["custom_id"]: line for line in read_jsonl(Path(summary["output_file"]))}
    assert {cid: without_ids(line) for cid, line in again.items()} == {
        cid: without_ids(line) for cid, line in first_out.items()}


def test_in_this_process_an_all_cached_batch_leaves_the_engine_unloaded(cached_settings, sqlite_instance, tiny_model,
                                                                       loaded_engine):
    lines = [chat(f"q{i}", f"Another question {i}") for i in range(20)]
    run(cached_settings, sqlite_instance, tiny_model, lines, "warm")
    VLLMEngine.release()  # the session's engine goes: a batch that needs one must load it again
    loads = VLLMEngine.process.loads
    summary, _, _ = run(cached_settings, sqlite_instance, tiny_model, lines, "cold")
    assert summary["from_cache"] == 20
    assert VLLMEngine.process.loads == loads and VLLMEngine.process.loaded is None
