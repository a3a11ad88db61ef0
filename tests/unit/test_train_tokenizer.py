"""The tiny student's tokenizer: byte-level BPE from the training texts + chat template."""

from __future__ import annotations

import pytest

from ray_pipeline.train.data import Example, render_prompt
from ray_pipeline.train.tokenizer import (
    ROLE_TOKENS,
    build_tiny_tokenizer,
    load_hub_tokenizer,
    tokenizer_corpus,
)

CORPUS = [
    "this article is well sourced",
    "you are a moron, your edit is unclear",
    '{"toxic": 1}',
    '{"toxic": 0}',
] * 20


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(CORPUS, vocab_size=400)


def test_roundtrip_any_text(tok):
    # Byte-level: text never seen in training (accents, emoji, CJK) still round-trips.
    for text in [
        "this article is well sourced",
        "Ünïcödé — 😀 漢字",
        '{"toxic": 1}',
        "  spaces  and\nnewlines",
    ]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids


def test_learned_merges_make_corpus_words_short(tok):
    # Frequent words become single tokens: far fewer tokens than bytes.
    ids = tok("this article is well sourced", add_special_tokens=False)["input_ids"]
    assert len(ids) <= 8


def test_special_tokens_are_single_ids(tok):
    for t in [tok.pad_token, tok.bos_token, tok.eos_token, *ROLE_TOKENS]:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert render_prompt(tok, messages) == "<s><|system|>Be brief.</s><|user|>hi</s><|assistant|>"
    assert (
        tok.apply_chat_template(messages, tokenize=False)
        == "<s><|system|>Be brief.</s><|user|>hi</s>"
    )


def test_save_and_reload_keeps_everything(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "you are a moron"}]
    assert render_prompt(again, messages) == render_prompt(tok, messages)
    text = render_prompt(tok, messages) + '{"toxic": 1}'
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert (again.pad_token_id, again.eos_token_id, len(again)) == (
        tok.pad_token_id,
        tok.eos_token_id,
        len(tok),
    )
    # A hub-style load of the same directory keeps its template and pad token.
    hub = load_hub_tokenizer(str(tmp_path))
    assert hub.chat_template == tok.chat_template and hub.pad_token == "<pad>"


def test_corpus_holds_messages_and_targets():
    ex = Example(id="a", messages=[{"role": "user", "content": "hello"}], target='{"toxic": 0}')
    assert list(tokenizer_corpus([ex])) == ["hello", '{"toxic": 0}']


def test_hub_tokenizer_without_template_or_pad_gets_both(tmp_path):
    base = build_tiny_tokenizer(CORPUS, vocab_size=300)
    base.chat_template = None
    base.pad_token = None
    base.save_pretrained(tmp_path)
    tok = load_hub_tokenizer(str(tmp_path))
    assert tok.pad_token_id == tok.eos_token_id  # padding is masked out of the loss anyway
    assert (
        render_prompt(tok, [{"role": "user", "content": "hi"}]) == "<|user|>\nhi\n<|assistant|>\n"
    )
