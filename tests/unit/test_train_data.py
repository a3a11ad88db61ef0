"""Training examples: targets, validation split, nested subsets, label masking, padding."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from ray_pipeline.data.schema import dumps, new_row, row_id, to_table
from ray_pipeline.train.data import (
    IGNORE_INDEX,
    Example,
    encode_example,
    encode_examples,
    is_validation,
    load_examples,
    nested_subset,
    pad_batch,
    split_examples,
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
    assert canonical[0].label == "1"
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
    examples = _examples(2000)
    train, val = split_examples(examples, 0.1)
    assert len(train) + len(val) == 2000
    assert 150 < len(val) < 250  # ~10%
    # Fixed by the id alone: another order, another call, the same rows.
    train2, val2 = split_examples(list(reversed(examples)), 0.1)
    assert {e.id for e in val2} == {e.id for e in val}
    assert all(is_validation(e.id, 0.1) for e in val)
    # Growing the fraction only moves rows into validation, never out of it.
    _, val_more = split_examples(examples, 0.2)
    assert {e.id for e in val} < {e.id for e in val_more}
    assert split_examples(examples, 0.0)[1] == []


def test_split_refuses_to_leave_no_training_rows():
    with pytest.raises(ValueError, match="no training rows"):
        split_examples(_examples(3), 0.99)


def test_nested_subsets():
    examples = _examples(101)
    half = nested_subset(examples, 0.5, seed=7)
    full = nested_subset(examples, 1.0, seed=7)
    assert len(half) == 50 and len(full) == 101
    assert {e.id for e in half} < {e.id for e in full}
    assert nested_subset(list(reversed(examples)), 0.5, seed=7) == half  # input order is irrelevant
    assert {e.id for e in nested_subset(examples, 0.5, seed=8)} != {e.id for e in half}
    assert len(nested_subset(examples, 0.001, seed=7)) == 1
    with pytest.raises(ValueError):
        nested_subset(examples, 0.0, seed=7)


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
