"""Stand-ins for the examples' `--tiny` mode: nothing is downloaded, everything runs on a CPU in seconds.

- `build_byte_tokenizer`: a byte-level tokenizer built in memory (every byte one token; pad/bos/eos ids 0/1/2, a
  small chat template), the same as `tests/tiny_tokenizer.py`, re-implemented so that the examples do not import the
  tests;
- `build_tiny_target`: a seeded random Llama or Qwen2 target built from a config (hidden 64, 2 layers, 4 heads, 2
  KV heads), with the tokenizer's vocabulary;
- `save_tiny_target`: that target and the tokenizer saved to a folder, for code that takes a name or path;
- `tiny_texts`: short text samples cut from the Python standard library's own sources, for training.

The examples import this file as `_tiny` (Python puts a script's own folder first on `sys.path`).
"""

import inspect
import json
import os
import textwrap

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHAT_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Each turn is "<|role|>content<|end|>".
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message.role }}|>{{ message.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
TARGET_CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
TINY_PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import os\nimport sys\n", "Speculative decoding is"]


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (263 tokens) with pad/bos/eos ids 0/1/2, chat role markers and a chat template."""
    vocab = {token: index for index, token in enumerate([PAD, BOS, EOS, *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_MARKERS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_target(family: str = "llama", seed: int = 0) -> PreTrainedModel:
    """A seeded random `family` (`"llama"` or `"qwen2"`) target in eval mode, sized for the byte tokenizer."""
    config_class, model_class = TARGET_CLASSES[family]
    config = config_class(vocab_size=len(build_byte_tokenizer()), **TINY_SHAPE)
    torch.manual_seed(seed)
    return model_class(config).eval()


def save_tiny_target(folder: str, family: str = "llama", seed: int = 0) -> str:
    """Save `build_tiny_target(family, seed)` and the byte tokenizer to `folder`; returns `folder`."""
    build_tiny_target(family, seed).save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return folder


def tiny_texts(num_samples: int = 64, length: int = 200) -> list[str]:
    """`num_samples` pieces of about `length` characters of the standard library's own source code."""
    source = "\n".join(inspect.getsource(module) for module in (textwrap, json, inspect))
    step = max(1, (len(source) - length) // num_samples)
    return [source[start : start + length] for start in range(0, step * num_samples, step)]


def write_jsonl(path: str, records: list[dict]) -> str:
    """Write `records` as JSON Lines to `path` (parent folders created); returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path
