"""Write a sample OpenAI batch file: chat and completion requests, plus a few deliberately bad lines.

usage: python examples/make_sample_batch.py OUT.jsonl [--requests N] [--model NAME] [--max-tokens K] [--no-bad-lines]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TOPICS = ["the sea", "a quick brown fox", "batch inference", "the capital of France", "a haiku", "a lazy dog"]


def sample_lines(count: int, model: str, max_tokens: int, bad_lines: bool, seed: int = 0) -> list[str]:
    """`count` valid request lines (and, if asked, a few invalid ones spread through the file)."""
    rnd = random.Random(seed)
    lines = []
    for i in range(count):
        topic = rnd.choice(TOPICS)
        if i % 4 == 3:
            body = {"model": model, "prompt": f"Write about {topic}.", "max_tokens": max_tokens, "temperature": 0}
            url = "/v1/completions"
        else:
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                 {"role": "user", "content": f"Tell me about {topic}. Request {i}."}]}
            url = "/v1/chat/completions"
        lines.append(json.dumps({"custom_id": f"request-{i}", "method": "POST", "url": url, "body": body}))
    if bad_lines:
        bad = [
            '{"custom_id": "broken-json", "method": "POST", "url": "/v1/chat/completions", "body": {',
            json.dumps({"custom_id": "request-0", "method": "POST", "url": "/v1/completions",
                        "body": {"model": model, "prompt": "a duplicate custom_id"}}),
            json.dumps({"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": model}}),
        ]
        for offset, text in enumerate(bad):
            lines.insert(min(len(lines), (offset + 1) * max(1, count // 4)), text)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--no-bad-lines", action="store_true")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = sample_lines(args.requests, args.model, args.max_tokens, not args.no_bad_lines)
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
