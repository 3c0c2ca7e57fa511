"""Benchmark inputs: model folders of real architectures (random or dummy weights) and batch files.

Prompts are token ids (`/v1/completions` with a list of ints), outputs have a fixed length
(`ignore_eos`), so every system under test does exactly the same work.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# Real architectures, loaded with load_format="dummy" (random weights from config.json alone).
SHAPES = {
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True},
    "llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False},
}
LLAMA3_VOCAB = 128256


def add_workload_arguments(parser, requests: int, max_model_len: int) -> None:
    """The options every CPU comparison takes: the model, the batch's shape and the engine's context length."""
    parser.add_argument("--model", help="A model folder (default: the tiny test model).")
    parser.add_argument("--requests", type=int, default=requests)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=max_model_len)


def write_shape(name: str, target: Path) -> Path:
    """A Llama-3 shaped model folder: config.json plus a synthetic 128k-token word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from batch_pipeline.domain.tiny_model import CHAT_TEMPLATE

    target.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": LLAMA3_VOCAB,
              "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
              "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"},
              "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1, **SHAPES[name]}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, LLAMA3_VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(target)
    return target


def vocabulary_words(model_dir: Path) -> list[str]:
    """Words that are one token each in the model's tokenizer (so prompt lengths are exact)."""
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    words = [w for w in vocab if w.isalpha() and w.isascii()]
    return words or list(vocab)


def write_batch(path: Path, requests: int, prompt_len: int, output_len: int, words: list[str], model: str,
                mixed: bool = False, seed: int = 0) -> Path:
    """A batch of chat requests (the endpoint `vllm run-batch` supports); `mixed` draws lengths from
    [len/4, 2*len]. Prompts are `prompt_len` words, each one token in the model's tokenizer."""
    rnd = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for i in range(requests):
            p_len = rnd.randint(max(1, prompt_len // 4), prompt_len * 2) if mixed else prompt_len
            o_len = rnd.randint(max(1, output_len // 4), output_len * 2) if mixed else output_len
            text = " ".join(rnd.choice(words) for _ in range(p_len))
            body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": o_len,
                    "temperature": 0.8, "ignore_eos": True}
            out.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": body}) + "\n")
    return path


def read_batch(path: Path) -> list[tuple[list[dict], int]]:
    """(messages, max_tokens) for every line."""
    rows = []
    with path.open() as handle:
        for line in handle:
            body = json.loads(line)["body"]
            rows.append((body["messages"], body["max_tokens"]))
    return rows


def split_batch(big: Path, work: Path, small: int, small_requests: int) -> tuple[list[Path], Path]:
    """The big batch's requests as `small` files of `small_requests` each, and a one-request warm-up file."""
    lines = big.read_text().splitlines(keepends=True)
    smalls = []
    for i in range(small):
        path = work / f"small-{i}.jsonl"
        path.write_text("".join(lines[i * small_requests:(i + 1) * small_requests]))
        smalls.append(path)
    warmup = work / "warmup.jsonl"
    warmup.write_text(lines[0])
    return smalls, warmup
