"""Tokenizers: a byte-level BPE trained on the training texts for the 'tiny' student, or a hub
tokenizer. Either way it has a chat template and a pad token, and it is saved into every
checkpoint so the student is served with exactly the tokenizer it was trained with."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("distill.train")

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# One token per role marker and an end-of-sequence after each turn: short sequences and a
# clear "stop" for the model to learn. Unknown roles still render (as plain text).
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# For hub tokenizers without a chat template (base models): plain-text role markers.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE trained on `texts` (any text stays encodable: bytes are the alphabet),
    wrapped as a transformers fast tokenizer with special tokens and the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[*SPECIAL_TOKENS.values(), *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, **SPECIAL_TOKENS, additional_special_tokens=ROLE_TOKENS
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tokenizer_corpus(examples: Iterable[Any]) -> Iterable[str]:
    """The texts a tiny tokenizer learns from: every message content and every target."""
    for ex in examples:
        for m in ex.messages:
            if isinstance(m.get("content"), str):
                yield m["content"]
        yield ex.target


def load_hub_tokenizer(name_or_path: str) -> Any:
    """A pretrained tokenizer, made usable for training: a pad token (many causal LMs have
    none; labels mask padding, so reusing eos is safe) and a chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        log.warning("tokenizer %s has no chat template; using a plain-text one", name_or_path)
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    return tok
