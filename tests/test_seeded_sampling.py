"""Seeded sampling on the CPU build: hundreds of seeded requests in one batch run, and a seed reproduces its text.

vLLM's CPU engine core used to die here ("CPU Generator does not use offset") once a step held a
partial prefill of a seeded request, taking the whole batch with it.
"""

from __future__ import annotations

from collections import Counter

from openai.types.chat import ChatCompletion

from tests.support.inprocess import run_batch
from tests.support.request_lines import chat_line


def test_five_hundred_seeded_requests_complete_and_each_seed_reproduces(settings, sqlite_instance, tiny_model,
                                                                         loaded_engine):
    lines = [chat_line(f"seeded-{i}", f"Tell me a story about the number {i}, with some detail", temperature=0.7,
                  seed=i % 250, max_tokens=12) for i in range(500)]
    result, outputs, errors = run_batch(settings, sqlite_instance, tiny_model, lines, batch_id="seeded")
    assert errors == [] and result.summary["completed"] == 500
    text = {o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"] for o in outputs}

    # Sampling really samples: different seeds on the same prompt give different texts.
    same_prompt = [chat_line(f"seed-{s}", "Tell me a story", temperature=0.7, seed=s, max_tokens=12) for s in range(8)]
    # The same seed and prompt give the same text in another batch, alone or among other requests.
    again = [chat_line(f"seeded-{i}", f"Tell me a story about the number {i}, with some detail", temperature=0.7,
                  seed=i % 250, max_tokens=12) for i in (0, 1, 249, 499)]
    _, outputs2, errors2 = run_batch(settings, sqlite_instance, tiny_model, again + same_prompt, batch_id="seeded-again")
    assert errors2 == []
    text2 = {o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"] for o in outputs2}
    assert {k: text2[k] for k in ("seeded-0", "seeded-1", "seeded-249", "seeded-499")} == \
        {k: text[k] for k in ("seeded-0", "seeded-1", "seeded-249", "seeded-499")}
    distinct = Counter(text2[f"seed-{s}"] for s in range(8))
    assert len(distinct) > 1, distinct

    # Each response says how many prompt tokens came from vLLM's prefix cache (none seen on the CPU build yet).
    bodies = [ChatCompletion.model_validate(o["response"]["body"]) for o in outputs2]
    assert all(0 <= b.usage.prompt_tokens_details.cached_tokens <= b.usage.prompt_tokens for b in bodies)
