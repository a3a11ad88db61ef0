"""Training examples: targets, validation split, nested subsets, label masking, padding,
packing, and the Ray Data map that tokenizes curated rows."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from ray_pipeline.data.schema import dumps, new_row, row_id, to_table
from ray_pipeline.train.data import (
    IGNORE_INDEX,
    Example,
    collate,
    encode_example,
    encode_examples,
    encode_rows,
    in_split,
    in_subset,
    is_validation,
    load_examples,
    pack_batch,
    pack_examples,
    pad_batch,
)
from ray_pipeline.train.tokenizer import build_tiny_tokenizer, tokenizer_corpus


def _examples(n: int) -> list[Example]:
    return [
        Example(
            id=row_id("t", str(i)),
            messages=[{"role": "user", "content": f"text {i}"}],
            target='{"toxic": 0}',
        )
        for i in range(n)
    ]


def _write_dataset(path, rows) -> str:
    path.mkdir(parents=True)
    pq.write_table(to_table(rows), path / "part-0.parquet")
    return str(path)


def _row(text: str, label: str, raw: str) -> dict:
    return new_row(
        id=row_id("t", text),
        input=text,
        messages=dumps([{"role": "user", "content": f"Is it toxic? {text}"}]),
        response=raw,
        output=dumps({"toxic": int(label)}),
        label=label,
    )


def test_load_examples_targets(tmp_path):
    raw = '```json\n{"toxic": 1}\n```'
    d = _write_dataset(
        tmp_path / "ds", [_row("you idiot", "1", raw), _row("fine edit", "0", '{"toxic": 0}')]
    )
    canonical = load_examples(d, "canonical")
    assert [e.target for e in canonical] == ['{"toxic": 1}', '{"toxic": 0}']
    assert canonical[0].messages == [{"role": "user", "content": "Is it toxic? you idiot"}]
    assert canonical[0].label == "1" and canonical[0].source is None
    assert [e.target for e in load_examples(d, "raw")] == [raw, '{"toxic": 0}']


def test_load_examples_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="distill curate"):
        load_examples(tmp_path / "missing", "canonical")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_examples(tmp_path / "empty", "canonical")
    no_rows = tmp_path / "no_rows"
    _write_dataset(no_rows, [])
    with pytest.raises(ValueError, match="has no rows"):
        load_examples(no_rows, "canonical")
    no_label = tmp_path / "no_label"
    no_label.mkdir()
    pq.write_table(to_table([_row("x", "0", "{}")]).drop(["label"]), no_label / "p.parquet")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['label'\]"):
        load_examples(no_label, "canonical")
    unanswered = tmp_path / "unanswered"
    _write_dataset(unanswered, [{**_row("x", "0", "{}"), "output": None}])
    with pytest.raises(ValueError, match="empty 'output'"):
        load_examples(unanswered, "canonical")


def test_validation_split_is_deterministic_and_sized():
    ids = [e.id for e in _examples(2000)]
    val = {i for i in ids if in_split(i, "val", 0.1)}
    train = {i for i in ids if in_split(i, "train", 0.1)}
    assert train | val == set(ids) and not train & val
    assert 150 < len(val) < 250  # ~10%
    assert all(is_validation(i, 0.1) for i in val)  # fixed by the id alone
    # Growing the fraction only moves rows into validation, never out of it.
    assert val < {i for i in ids if in_split(i, "val", 0.2)}
    assert not any(in_split(i, "val", 0.0) for i in ids)


def test_nested_subsets():
    ids = [e.id for e in _examples(2000)]
    half = {i for i in ids if in_subset(i, 0.5, seed=7)}
    tenth = {i for i in ids if in_subset(i, 0.1, seed=7)}
    assert 900 < len(half) < 1100 and 150 < len(tenth) < 250
    assert tenth < half  # nested
    assert all(in_subset(i, 1.0, seed=7) for i in ids)
    assert {i for i in ids if in_subset(i, 0.5, seed=8)} != half  # another seed, other rows
    with pytest.raises(ValueError, match="fraction must be in"):
        in_subset(ids[0], 0.0, seed=7)


def test_encode_rows_keeps_its_split_and_subset_and_flags_truncation():
    examples = _examples(60)
    tok = build_tiny_tokenizer(tokenizer_corpus(examples), vocab_size=300)
    rows = [
        _row(f"comment {i} " + "long " * (40 if i % 7 == 0 else 1), str(i % 2), "ok")
        for i in range(60)
    ]
    batch = {
        k: [r[k] for r in rows] for k in ("id", "messages", "output", "response", "label", "input")
    }
    common = dict(
        val_fraction=0.2, tokenizer=tok, max_seq_len=40, labels=["0", "1"], target="canonical"
    )
    val = encode_rows(batch, split="val", kind="causal_lm", **common)
    train = encode_rows(batch, split="train", kind="causal_lm", **common)
    assert len(val["input_ids"]) == sum(in_split(r["id"], "val", 0.2) for r in rows)
    assert len(val["input_ids"]) + len(train["input_ids"]) == 60
    assert all(len(ids) <= 40 for ids in train["input_ids"])
    long_train = [r for r in rows if in_split(r["id"], "train", 0.2) and "long long" in r["input"]]
    assert sum(train["truncated"]) == len(long_train) > 0
    half = encode_rows(batch, split="train", kind="causal_lm", fraction=0.5, seed=1, **common)
    expected = sum(in_split(r["id"], "train", 0.2) and in_subset(r["id"], 0.5, 1) for r in rows)
    assert len(half["input_ids"]) == expected
    classes = encode_rows(batch, split="train", kind="classifier", **common)
    assert classes["labels"] == [int(r["label"]) for r in rows if in_split(r["id"], "train", 0.2)]


def test_encode_rows_names_a_row_without_an_answer():
    rows = [_row("a", "1", "x"), {**_row("b", "0", "y"), "output": None}]
    batch = {
        k: [r[k] for r in rows] for k in ("id", "messages", "output", "response", "label", "input")
    }
    tok = build_tiny_tokenizer(tokenizer_corpus(_examples(4)), vocab_size=300)
    with pytest.raises(ValueError, match=f"curated row {rows[1]['id']} has an empty 'output'"):
        encode_rows(
            batch,
            split="train",
            val_fraction=0.0,
            tokenizer=tok,
            kind="causal_lm",
            max_seq_len=64,
            labels=["0", "1"],
            target="canonical",
        )


def test_encode_masks_prompt_and_keeps_answer():
    ids, labels = encode_example([1, 2, 3], [7, 8], eos_id=9, max_seq_len=10)
    assert ids == [1, 2, 3, 7, 8, 9]
    assert labels == [IGNORE_INDEX] * 3 + [7, 8, 9]


def test_encode_truncates_prompt_from_the_left_only():
    prompt = list(range(100, 120))
    ids, labels = encode_example(prompt, [7, 8], eos_id=9, max_seq_len=8)
    assert ids == [115, 116, 117, 118, 119, 7, 8, 9]  # the prompt's end, then the whole answer
    assert labels == [IGNORE_INDEX] * 5 + [7, 8, 9]


def test_encode_refuses_answer_that_does_not_fit():
    with pytest.raises(
        ValueError, match=r"example r1: the answer is 4 tokens.*raise train.max_seq_len above 4"
    ):
        encode_example([1, 2], [5, 6, 7], eos_id=9, max_seq_len=4, example_id="r1")


def test_encode_examples_with_chat_template():
    examples = _examples(4)
    tok = build_tiny_tokenizer(tokenizer_corpus(examples), vocab_size=300)
    enc = encode_examples(tok, examples, max_seq_len=64)
    first = enc[0]
    answer = [t for t in first["labels"] if t != IGNORE_INDEX]
    assert tok.decode(answer[:-1]) == '{"toxic": 0}'
    assert answer[-1] == tok.eos_token_id
    prompt_len = first["labels"].count(IGNORE_INDEX)
    assert tok.decode(first["input_ids"][:prompt_len]) == "<s><|user|>text 0</s><|assistant|>"


def test_pad_batch_right_pads_and_masks():
    batch = pad_batch([[1, 2, 3], [4]], [[IGNORE_INDEX, 2, 3], [4]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]


def test_length_grouped_batches_cover_every_example_once_with_less_padding():
    import random

    from ray_pipeline.train.data import length_grouped_batches

    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(100)]
    batches = length_grouped_batches(lengths, 8, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert [len(b) for b in batches].count(8) == 12 and sum(map(len, batches)) == 100

    def padded(groups):
        return sum(len(b) * max(lengths[i] for i in b) for b in groups)

    shuffled = list(range(100))
    random.Random(2).shuffle(shuffled)
    random_batches = [shuffled[i : i + 8] for i in range(0, 100, 8)]
    assert padded(batches) < 0.7 * padded(random_batches)
    # Within a batch the lengths are neighbours; the batches' order is random, not sorted.
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) < 60 for b in batches)
    assert [max(lengths[i] for i in b) for b in batches] != sorted(
        max(lengths[i] for i in b) for b in batches
    )
    assert batches == length_grouped_batches(lengths, 8, random.Random(1))  # seeded


def test_pack_examples_first_fit_decreasing():
    rows = pack_examples([5, 3, 8, 2, 4], max_len=10)
    assert rows == [[2, 3], [0, 4], [1]]  # 8+2, 5+4, 3
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="12 tokens cannot be packed into 10"):
        pack_examples([12], max_len=10)


def test_pack_batch_restarts_positions_and_masks_each_first_label():
    ids = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    labels = [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 5], [IGNORE_INDEX, IGNORE_INDEX, 8, 9]]
    batch = pack_batch(ids, labels, pad_id=0, max_len=6)
    assert "attention_mask" not in batch  # transformers finds the examples from the positions
    assert batch["input_ids"].tolist() == [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 8, 9, IGNORE_INDEX, 5],
        [IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
    ]


def test_packed_examples_see_only_themselves():
    """A packed example's logits equal its logits alone: transformers keeps attention within
    each example when position ids restart and there is no attention mask."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        use_cache=False,
    )
    model = LlamaForCausalLM(config).eval()
    ids = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14]]
    labels = [[IGNORE_INDEX, *x[1:]] for x in ids]
    batch = pack_batch(ids, labels, pad_id=0, max_len=12)
    assert batch["input_ids"].shape[0] == 1  # all three in one row
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        at = 0
        for i in pack_examples([len(x) for x in ids], 12)[0]:
            alone = model(input_ids=torch.tensor([ids[i]])).logits[0]
            torch.testing.assert_close(packed[at : at + len(ids[i])], alone, atol=1e-5, rtol=1e-4)
            at += len(ids[i])
        # And the loss over the packed row is the loss over the same examples padded.
        padded = pad_batch(ids, labels, pad_id=0)
        loss_packed = model(**batch).loss
        loss_padded = model(**padded).loss
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-4)


def test_collate_counts_examples_tokens_targets_and_padding():
    import numpy as np

    ids = [np.array([1, 2, 3]), np.array([4])]
    labels = [np.array([IGNORE_INDEX, 2, 3]), np.array([4])]
    batch, counts = collate(
        {"input_ids": ids, "labels": labels, "truncated": np.array([True, False])}, pad_id=0
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    # Targets: labels after the causal shift (each sequence's first label is never predicted).
    assert (counts.examples, counts.tokens, counts.targets) == (2, 4, 2)
    assert (counts.truncated, counts.positions) == (1, 6)
    packed, packed_counts = collate({"input_ids": ids, "labels": labels}, pad_id=0, pack_to=8)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4]] and packed_counts.positions == 4
    classes, class_counts = collate(
        {"input_ids": ids, "labels": np.array([1, 0])}, pad_id=0, pack_to=8
    )
    assert classes["labels"].tolist() == [1, 0] and class_counts.targets == 2  # never packed
