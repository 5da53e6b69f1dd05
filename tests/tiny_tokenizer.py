"""A tiny byte-level tokenizer for the training-data tests, built in memory (nothing downloaded).

Every byte is one token (a BPE with no merges over the 256 byte-level symbols), so token counts are character counts
for ASCII text. The special tokens match the tiny targets of conftest.py (pad 0, bos 1, eos 2), and the vocabulary
(263 tokens) fits both targets' embeddings (Llama 512, Qwen2 384).
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
# Each turn is "<|role|>content<|end|>"; a system turn is rendered like the others.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message.role }}|>{{ message.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# The same rendering with the assistant text marked for Transformers' `return_assistant_tokens_mask`.
GENERATION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message.role }}|>"
    "{% if message.role == 'assistant' %}{% generation %}{{ message.content }}<|end|>{% endgeneration %}"
    "{% else %}{{ message.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_byte_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with pad/bos/eos ids 0/1/2, chat role markers, and `chat_template` (None for none)."""
    vocab = {token: index for index, token in enumerate([PAD, BOS, EOS, *sorted(ByteLevel.alphabet())])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS)
    tokenizer.add_special_tokens({"additional_special_tokens": [SYSTEM, USER, ASSISTANT, END_OF_TURN]})
    tokenizer.chat_template = chat_template
    return tokenizer
