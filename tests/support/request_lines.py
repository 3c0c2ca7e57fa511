"""Request lines of a batch input file, as the OpenAI Batch API defines them."""

from __future__ import annotations

MODEL_NAME = "tiny-llama"
# Several KV-cache blocks long: a request with it again (or after it) finds them in vLLM's prefix cache.
LONG_PROMPT = "You are a careful assistant. Answer in one short sentence. " * 24


def chat_line(custom_id: str, content: str, model: str = MODEL_NAME, **body: object) -> dict:
    """A /v1/chat/completions line: one user message, 8 tokens, greedy, unless `body` says otherwise."""
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
                     "temperature": 0, **body}}


def completion_line(custom_id: str, prompt: object, model: str = MODEL_NAME, **body: object) -> dict:
    """A /v1/completions line: 8 tokens, greedy, unless `body` says otherwise."""
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **body}}


def chat_lines(count: int, max_tokens: int = 16, model: str = "tiny") -> list[dict]:
    """`count` chat lines q0, q1, ... that each generate exactly `max_tokens` tokens."""
    return [chat_line(f"q{i}", f"Question number {i}?", model, max_tokens=max_tokens, ignore_eos=True)
            for i in range(count)]


def item_line(custom_id: str, model: str = MODEL_NAME, max_tokens: int = 8, **body: object) -> dict:
    """A completion line "Item CUSTOM_ID is" that generates exactly `max_tokens` tokens."""
    return completion_line(custom_id, f"Item {custom_id} is", model, max_tokens=max_tokens, ignore_eos=True, **body)
