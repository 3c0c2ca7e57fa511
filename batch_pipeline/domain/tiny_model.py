"""Build a tiny random-weight Llama model and tokenizer on disk, for tests and the demo.

No model can be downloaded on the machines this project is tested on, so the tests and `make demo`
build one: a byte-level BPE tokenizer trained on a small built-in corpus, wrapped with a chat
template, and a 2-layer Llama with random weights (head_dim 64, which the CPU attention backend
supports). Its text is gibberish, but deterministic at temperature 0.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

_CORPUS = """The quick brown fox jumps over the lazy dog. Batch inference turns many requests into results.
Label this review as positive or negative. Translate the sentence into French. Summarise the text.
{"label": "yes", "score": 1, "items": [1, 2, 3], "name": "value"} true false null 0123456789
Question: what is the capital of France? Answer: Paris. Write a haiku about the sea and the sky.
You are a helpful assistant. Hello, how are you today? Please answer briefly and clearly.
"""


def build_tiny_model(target: Path, *, vocab_size: int = 2048, max_position_embeddings: int = 2048) -> Path:
    """Write a tiny random Llama and its tokenizer to `target`; return the directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    target = Path(target)
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([_CORPUS] * 50, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(target)

    torch.manual_seed(0)
    # torch_dtype is still read by the transformers that vLLM uses, though its stubs no longer list it.
    config = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=len(fast),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(target, safe_serialization=True)
    # vLLM reads the chat template from tokenizer_config.json; keep a copy in generation_config too.
    (target / "README.md").write_text("Random-weight test model built by `vllm-batch tiny-model`. Output is gibberish.\n")
    json.loads((target / "config.json").read_text())  # fail loudly if the write was partial
    return target
