"""A tiny character-level chat tokenizer, built offline.

Used by the tests (the `char_tokenizer` fixture) and by the runtime when the policy is a tiny
random-init model, so nothing has to be downloaded. One token per printable ASCII character plus
newline; `<|im_start|>` / `<|im_end|>` frame ChatML turns and `<|im_end|>` is both EOS and PAD
(as in SmolLM2). Any other character becomes `<unk>`.

    >>> tok = build_char_tokenizer()
    >>> tok.decode(tok("hi 42")["input_ids"])
    'hi 42'
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

UNK, IM_START, IM_END = "<unk>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (UNK, IM_START, IM_END)

# ChatML, as used by SmolLM2 / Qwen instruct models.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def char_vocab() -> dict[str, int]:
    """Special tokens first (ids 0..2), then printable ASCII and newline, one id per character."""
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII + "\n"
    tokens = [*SPECIAL_TOKENS, *chars]
    return {token: i for i, token in enumerate(tokens)}


def build_char_tokenizer(model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """Build the char-level `PreTrainedTokenizerFast` with a ChatML chat template (no network)."""
    if model_max_length < 1:
        raise ValueError(f"model_max_length must be >= 1, got {model_max_length}")
    backend = Tokenizer(models.WordLevel(vocab=char_vocab(), unk_token=UNK))
    # Every character (newline included) is its own "word"; special tokens are matched first.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters without the WordLevel default spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        eos_token=IM_END,
        pad_token=IM_END,
        additional_special_tokens=[IM_START],
        chat_template=CHATML_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer
