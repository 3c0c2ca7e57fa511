"""The finishing estimate: a batch's work, the model's measured history, the queue before it, and its progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from batch_pipeline.domain.batch_object import Batch
from batch_pipeline.domain.estimate import (
    Ahead,
    BatchWork,
    EstimateRecord,
    ModelHistory,
    estimate,
    live_estimate,
    measure_work,
)
from tests.support.files import REPO, write_jsonl

MODEL_NAME = "tiny-llama"
HISTORY = ModelHistory(batches=1, tokens_per_second=100.0, fill=0.5, before_step_seconds=4.0,
                       step_overhead_seconds=2.0, load_seconds=30.0, after_step_seconds=1.0)


def chat(custom_id: str, max_tokens: int | None = 16, **params) -> dict:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * 40}], **params}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def test_work_bounds_the_output_by_max_tokens_choices_and_prompts(tmp_path: Path):
    lines = [chat("a", 16), chat("b", None, max_completion_tokens=10, n=3),
             {"custom_id": "c", "method": "POST", "url": "/v1/completions",
              "body": {"model": MODEL_NAME, "prompt": ["one", "two"], "max_tokens": 5}},
             "{not json", chat("d", None)]
    path = write_jsonl(tmp_path / "b.jsonl", lines)
    work = measure_work(path, 1 << 20, model_len=100)
    # 16 + 10*3 + 5*2 + (100 - the prompt's 10 tokens): a request without max_tokens may fill the context
    assert work.requests == 4 and work.unbounded == 0
    assert work.output_tokens_bound == 16 + 30 + 10 + 90
    assert work.prompt_tokens == 10 + 10 + 2 + 10
    assert measure_work(path, 1 << 20, model_len=None).unbounded == 1


def test_no_history_or_no_bound_gives_null_with_a_reason():
    work = BatchWork(requests=10, output_tokens_bound=1000)
    made = estimate(1000.0, work, 0, False, None, [], {}, shared=False)
    assert made.expected_completed_at is None and "no finished batch of this model" in made.reason
    made = estimate(1000.0, BatchWork(requests=1, unbounded=1), 0, False, HISTORY, [], {}, shared=False)
    assert made.expected_completed_at is None and "set no max_tokens" in made.reason


def test_the_queue_ahead_delays_the_estimate_by_how_the_engine_is_shared():
    work = BatchWork(requests=10, output_tokens_bound=2000)  # 2000 * fill 0.5 = 1000 tokens = 10 s at 100 tok/s
    histories = {"m": HISTORY}
    alone = estimate(1000.0, work, 0, False, HISTORY, [], histories, shared=False, engine_warm=True)
    assert alone.expected_completed_at == 1000 + 4 + 2 + 10 + 1 and alone.expected_output_tokens == 1000
    cold = estimate(1000.0, work, 0, False, HISTORY, [], histories, shared=False)  # the engine loads first
    assert cold.expected_completed_at == alone.expected_completed_at + 30
    big = Ahead("big", "m", remaining_tokens=3000, started=True)  # 30 s of engine time left
    small = Ahead("small", "m", remaining_tokens=500, started=False)  # 5 s, and its step overhead
    one_after_another = estimate(1000.0, work, 0, False, HISTORY, [big, small], histories, shared=False,
                                 engine_warm=True)
    assert one_after_another.expected_completed_at == 1000 + (30 + 5 + 2) + 2 + 10 + 1
    assert one_after_another.queued_ahead == 2
    side_by_side = estimate(1000.0, work, 0, False, HISTORY, [big, small], histories, shared=True, engine_warm=True)
    assert side_by_side.expected_completed_at == 1000 + 4 + 2 + (10 + 10 + 5) + 1
    unknown = estimate(1000.0, work, 0, False, HISTORY, [Ahead("old", "m", None, True)], histories, shared=True)
    assert unknown.expected_completed_at is None and "batch old" in unknown.reason


def test_a_running_batch_is_estimated_again_from_its_progress():
    work = BatchWork(requests=10, output_tokens_bound=2000)
    recorded = EstimateRecord(work=work, at_submit=estimate(1000.0, work, 0, False, HISTORY, [], {"m": HISTORY},
                                                            shared=True, engine_warm=True))
    batch = Batch(id="b", endpoint="/v1/chat/completions", input_file_id="", completion_window="24h",
                  status="in_progress", created_at=1000)
    from batch_pipeline.domain.batches import BatchSpec

    spec = BatchSpec(batch_id="b", input_path="x", model="m", model_name="m", chunk_size=4, created_at=1000.0)
    halfway = live_estimate(batch, spec, recorded, 500, {"m": HISTORY}, [], True, now=1010.0)
    assert halfway.expected_completed_at == 1010 + 5 + 1 and halfway.at_submit == 1017
    done = live_estimate(batch.model_copy(update={"status": "completed"}), spec, recorded, 1000, {}, [], True, 1030.0)
    assert done.expected_completed_at is None and done.at_submit == 1017 and done.reason == "the batch is completed"
    assert live_estimate(batch, spec, None, 0, {}, [], True, 1010.0) is None


def test_submitted_batches_are_estimated_from_the_models_last_run(settings, sqlite_instance, tiny_model,
                                                                  loaded_engine):
    from batch_pipeline.entrypoints.api.service import BatchService
    from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process

    first = write_jsonl(settings.resolved_data_dir.parent / "first.jsonl",
                        [chat(f"q{i}", 24, temperature=0, ignore_eos=True) for i in range(48)])
    service = BatchService(settings, sqlite_instance)
    # Nothing of the model has finished on this instance yet: no number, a reason.
    unknown = service.submit_file(first, str(tiny_model), batch_id="unknown").completion_estimate
    assert unknown.expected_completed_at is None and "no finished batch of this model" in unknown.reason
    service.cancel("unknown")

    spec = register_local_batch(settings, sqlite_instance, first, str(tiny_model), MODEL_NAME, batch_id="first")
    result = run_batch_in_process(settings, sqlite_instance, spec.batch_id)
    assert result.success, result.error

    history = service.estimator.histories(fresh=True)[str(tiny_model)]
    measured = result.summary["completion_tokens"] / result.summary["generation_seconds"]
    assert abs(history.tokens_per_second - measured) / measured < 0.01
    second = service.submit_file(first, str(tiny_model), batch_id="second")
    third = service.submit_file(first, str(tiny_model), batch_id="third")
    a, b = second.completion_estimate, third.completion_estimate
    assert a.expected_completed_at is not None and a.queued_ahead == 0 and b.queued_ahead == 1
    assert a.expected_output_tokens == 48 * 24  # ignore_eos: the model's last batch filled its bound
    # One after the other (no warm host here): the third cannot finish sooner after its creation than the second.
    # (Whole seconds: each estimate is truncated, so the two may differ by one either way.)
    assert b.expected_completed_at - third.created_at >= a.expected_completed_at - second.created_at - 1
    assert service.describe("third").completion_estimate == b  # queued: the estimate made at submit

    env = dict(os.environ, VBATCH_HOME=str(REPO), VBATCH_DATA_DIR=str(settings.data_dir),
               DAGSTER_HOME=str(settings.dagster_home), VBATCH_ENGINE_HOST="false", VBATCH_MAX_MODEL_LEN="1024")
    printed = subprocess.run([sys.executable, "-m", "batch_pipeline.entrypoints.cli", "submit", str(first), "--model",
                              str(tiny_model), "--batch-id", "fourth"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr
    assert "expected to finish at " in printed.stdout and "2 batches ahead" in printed.stdout
    as_json = json.loads(subprocess.run(
        [sys.executable, "-m", "batch_pipeline.entrypoints.cli", "status", "fourth", "--json"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300).stdout)
    assert as_json["completion_estimate"]["queued_ahead"] == 2
