"""Non-ASCII custom_ids, prompts and file names through a real run: every line comes back under its own id.

CJK, emoji (with zero-width joiners), right-to-left text and its override mark, combining marks: an id
is kept byte for byte (a composed and a decomposed "é" are two ids, never merged by normalisation), and
the batch's folder and file names stay ASCII whatever the input file is called.
"""

from __future__ import annotations

import json
import unicodedata

from batch_pipeline.domain.batches import valid_batch_id
from batch_pipeline.entrypoints.local_run import register_local_batch, run_batch_in_process
from tests.support.files import read_jsonl, write_jsonl

MODEL_NAME = "tiny-llama"

IDS = ["请求-一", "😀-emoji", "👩\u200d👩\u200d👧-family", "مرحبا-rtl", "\u202eoverride-rtl", "caf\u00e9",
       "cafe\u0301", "Ελληνικά", "한국어-요청", "ｆｕｌｌ-width", "x" * 40 + "-ascii"]
PROMPTS = ["东京的天气", "I ❤️ 🍕 and", "שלום עולם", "مرحبا بالعالم", "Café naïve e\u0301", "Привет, как",
           "日本語のテキスト", "Ελληνικά γράμματα", "한국어 문장", "ｆｕｌｌ ｗｉｄｔｈ", "plain ascii text"]


def completion(custom_id: str, prompt: str, model: str = MODEL_NAME) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}}


def texts(records: list[dict]) -> dict[str, str]:
    return {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in records}


def test_non_ascii_ids_and_prompts_come_back_line_for_line_under_safe_names(settings, sqlite_instance, tiny_model,
                                                                             loaded_engine, tmp_path):
    assert unicodedata.normalize("NFC", IDS[6]) == IDS[5]  # the same text to a reader, two ids to the batch
    lines: list = [completion(custom_id, prompt) for custom_id, prompt in zip(IDS, PROMPTS, strict=True)]
    lines.append(completion("未知模型-✗", "x", model="no-such-model"))  # rejected, under its own id
    lines.append('{"custom_id": "half-\\ud83d", "method": "POST", "url": "/v1/completions", "body": {}}')
    unicode_file = write_jsonl(tmp_path / "批次 😀 données\u0301.jsonl", lines)
    # The same prompts under ASCII ids, in the same order: what each line must get back (greedy, same batch).
    twins = [completion(f"twin-{i}", prompt) for i, prompt in enumerate(PROMPTS)]
    twin_file = write_jsonl(tmp_path / "twins.jsonl", twins)

    spec = register_local_batch(settings, sqlite_instance, unicode_file, str(tiny_model), MODEL_NAME)
    assert valid_batch_id(spec.batch_id) and spec.batch_id.isascii()
    run = run_batch_in_process(settings, sqlite_instance, spec.batch_id)
    assert run.success, run.error
    twin_spec = register_local_batch(settings, sqlite_instance, twin_file, str(tiny_model), MODEL_NAME)
    twin_run = run_batch_in_process(settings, sqlite_instance, twin_spec.batch_id)
    assert twin_run.success, twin_run.error

    output = read_jsonl(run.paths.output)
    assert [r["custom_id"] for r in output] == IDS  # input order, each id once and exactly as sent
    twin_texts = texts(read_jsonl(twin_run.paths.output))
    assert texts(output) == {custom_id: twin_texts[f"twin-{i}"] for i, custom_id in enumerate(IDS)}
    assert run.summary["completed"] == len(IDS) and run.summary["failed"] == 2

    errors = read_jsonl(run.paths.errors)
    assert [(e["custom_id"], e["error"]["line"]) for e in errors] == [("未知模型-✗", 12), (None, 13)]
    assert "surrogate" in errors[1]["error"]["message"]
    for path in (run.paths.output, run.paths.errors):
        path.read_bytes().decode("utf-8")  # valid UTF-8 throughout
        assert all(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())

    from resources.storage import read_parquet

    assert read_parquet(run.paths.results_parquet, ["custom_id"]).column("custom_id").to_pylist() == IDS
    # Every folder and file the batch made has an ASCII name; the input's own name is kept only as data.
    made = [path.relative_to(settings.resolved_data_dir) for path in run.paths.root.rglob("*")]
    assert made and all(str(path).isascii() for path in made), [p for p in made if not str(p).isascii()]
