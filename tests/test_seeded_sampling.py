"""Seeded sampling on the CPU build: hundreds of seeded requests in one batch run, and a seed reproduces its text.

vLLM's CPU engine core used to die here ("CPU Generator does not use offset") once a step held a
partial prefill of a seeded request, taking the whole batch with it.
"""

from __future__ import annotations

from collections import Counter

from openai.types.chat import ChatCompletion

from tests.support.inprocess import by_id, run_batch
from tests.support.request_lines import LONG_PROMPT, chat_line


def test_five_hundred_seeded_requests_complete_and_each_seed_reproduces(settings, sqlite_instance, tiny_model,
                                                                         loaded_engine):
    lines = [chat_line(f"seeded-{i}", f"Tell me a story about the number {i}, with some detail", temperature=0.7,
                  seed=i % 250, max_tokens=12) for i in range(500)]
    long = chat_line("long", LONG_PROMPT, temperature=0.7, seed=3, max_tokens=12)
    result, outputs, errors = run_batch(settings, sqlite_instance, tiny_model, [*lines, long], batch_id="seeded")
    assert errors == [] and result.summary["completed"] == 501
    first_long = ChatCompletion.model_validate(by_id(outputs)["long"]["response"]["body"]).usage
    text = {o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"] for o in outputs}

    # Sampling really samples: different seeds on the same prompt give different texts.
    same_prompt = [chat_line(f"seed-{s}", "Tell me a story", temperature=0.7, seed=s, max_tokens=12) for s in range(8)]
    # The same seed and prompt give the same text in another batch, alone or among other requests.
    again = [chat_line(f"seeded-{i}", f"Tell me a story about the number {i}, with some detail", temperature=0.7,
                  seed=i % 250, max_tokens=12) for i in (0, 1, 249, 499)]
    _, outputs2, errors2 = run_batch(settings, sqlite_instance, tiny_model, [*again, *same_prompt, long],
                                     batch_id="seeded-again")
    assert errors2 == []
    text2 = {o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"] for o in outputs2}
    assert {k: text2[k] for k in ("seeded-0", "seeded-1", "seeded-249", "seeded-499")} == \
        {k: text[k] for k in ("seeded-0", "seeded-1", "seeded-249", "seeded-499")}
    distinct = Counter(text2[f"seed-{s}"] for s in range(8))
    assert len(distinct) > 1, distinct

    # Each response says how many prompt tokens came from vLLM's prefix cache: a long seeded prompt of the first
    # batch, asked again, finds its blocks there.
    usage = {o["custom_id"]: ChatCompletion.model_validate(o["response"]["body"]).usage for o in outputs2}
    assert usage["long"].prompt_tokens == first_long.prompt_tokens
    assert 0 < usage["long"].prompt_tokens_details.cached_tokens < usage["long"].prompt_tokens
