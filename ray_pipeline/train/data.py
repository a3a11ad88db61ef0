"""From curated rows to training examples: targets, the validation split, nested subsets,
tokenization with label masking, and padding.

Plain Python (torch only inside ``pad_batch``), so every rule here is unit-tested without Ray.
The rules:
- the prompt is the row's chat messages through the tokenizer's chat template with the
  generation prompt appended, exactly what ``Student.complete`` feeds the model;
- the loss covers only the answer tokens and the end-of-sequence token;
- a sequence longer than ``max_seq_len`` loses the *start* of its prompt (the end of a prompt,
  next to the answer, matters most); the answer is never cut, a too-long one is an error.

A classifier student reads the row's input text (with the tokenizer's own special tokens,
its end cut past ``max_seq_len``) and learns the index of the row's label in the task's labels.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # label value the loss skips (torch.nn.CrossEntropyLoss's ignore_index)
TARGET_COLUMNS = {"canonical": "output", "raw": "response"}


@dataclass(frozen=True)
class Example:
    """One training example: the prompt's chat messages and the answer text to learn."""

    id: str
    messages: list[dict[str, Any]]
    target: str
    label: str | None = None
    input: str | None = None  # the raw input text (what a classifier student reads)


def load_examples(dataset_dir: str | Path, target: Literal["canonical", "raw"]) -> list[Example]:
    """The curated dataset (a Parquet dir in the row schema) as examples.

    target 'canonical' learns the parsed answer as stored (compact JSON, e.g. ``{"toxic": 1}``);
    'raw' learns the teacher's text as returned.
    """
    import pyarrow.parquet as pq

    column = TARGET_COLUMNS[target]
    path = Path(dataset_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"curated dataset {path} does not exist; run `distill curate` first"
        )
    files = list(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"curated dataset {path} is empty (no Parquet files): nothing to train on")
    table = pq.read_table(path)
    missing = {"id", "messages", column, "label", "input"} - set(table.column_names)
    if missing:
        raise ValueError(
            f"curated dataset {path} lacks column(s) {sorted(missing)} (train.target={target!r} "
            f"reads '{column}'); it must be in the row schema of ray_pipeline.data.schema"
        )
    rows = table.select(["id", "messages", column, "label", "input"]).to_pylist()
    if not rows:
        raise ValueError(f"curated dataset {path} has no rows: nothing to train on")
    out = []
    for r in rows:
        if not r[column]:
            raise ValueError(
                f"curated dataset {path}: row {r['id']} has an empty '{column}' "
                f"(train.target={target!r}); curate keeps only answered rows, was it edited?"
            )
        if not r["messages"]:
            raise ValueError(f"curated dataset {path}: row {r['id']} has no 'messages'")
        out.append(
            Example(
                id=r["id"],
                messages=json.loads(r["messages"]),
                target=r[column],
                label=r["label"],
                input=r["input"],
            )
        )
    return out


def stable_unit(*keys: object) -> float:
    """A number in [0, 1) fixed by the keys: the same in every process and every run."""
    digest = hashlib.sha256("\x00".join(map(str, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_validation(row_id: str, val_fraction: float) -> bool:
    """Whether a row belongs to the validation split. By a hash of the id alone (no seed), so a
    row stays on its side across runs, sweeps and dataset growth."""
    return stable_unit("val", row_id) < val_fraction


def split_examples(
    examples: Sequence[Example], val_fraction: float
) -> tuple[list[Example], list[Example]]:
    """(train, val) by ``is_validation``; order is kept."""
    train, val = [], []
    for ex in examples:
        (val if is_validation(ex.id, val_fraction) else train).append(ex)
    if not train:
        raise ValueError(
            f"no training rows left after holding out val_fraction={val_fraction} of {len(examples)}"
        )
    return train, val


def nested_subset(examples: Sequence[Example], fraction: float, seed: int) -> list[Example]:
    """The first ``fraction`` of a fixed seeded shuffle (ordered by id first, so the input order
    does not matter). Subsets of one seed are nested: the 50% subset is inside the 100% one."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ordered = sorted(examples, key=lambda ex: ex.id)
    random.Random(seed).shuffle(ordered)
    return ordered[: max(1, round(fraction * len(ordered)))]


def encode_example(
    prompt_ids: list[int],
    answer_ids: list[int],
    eos_id: int,
    max_seq_len: int,
    example_id: str = "?",
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of prompt + answer + eos, the prompt cut from the left to fit."""
    answer = [*answer_ids, eos_id]
    if len(answer) >= max_seq_len:
        raise ValueError(
            f"example {example_id}: the answer is {len(answer)} tokens (with end-of-sequence), "
            f"which leaves no room for the prompt in train.max_seq_len={max_seq_len}; raise "
            f"train.max_seq_len above {len(answer)}"
        )
    room = max_seq_len - len(answer)
    prompt = prompt_ids[-room:] if len(prompt_ids) > room else prompt_ids
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """The text the model sees before it answers (chat template + generation prompt)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_examples(
    tokenizer: Any, examples: Sequence[Example], max_seq_len: int
) -> list[dict[str, Any]]:
    """Tokenize examples into {"input_ids", "labels"} lists (batched: fast tokenizers run the
    batch in Rust). The chat template already holds any BOS, so no special tokens are added."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: the student could not learn to stop")
    prompts = tokenizer(
        [render_prompt(tokenizer, ex.messages) for ex in examples], add_special_tokens=False
    )["input_ids"]
    answers = tokenizer([ex.target for ex in examples], add_special_tokens=False)["input_ids"]
    out = []
    for ex, p, a in zip(examples, prompts, answers, strict=True):
        input_ids, labels = encode_example(p, a, tokenizer.eos_token_id, max_seq_len, ex.id)
        out.append({"input_ids": input_ids, "labels": labels})
    return out


def encode_classifier_examples(
    tokenizer: Any, examples: Sequence[Example], max_seq_len: int, labels: Sequence[str]
) -> tuple[list[dict[str, Any]], int]:
    """Tokenize examples' input texts into {"input_ids", "labels": class index}; returns them
    and how many were cut at ``max_seq_len``. An example whose label is not a task label is an
    error (curation keeps only rows with a valid label)."""
    index = {label: i for i, label in enumerate(labels)}
    bad = [ex.id for ex in examples if ex.label not in index]
    if bad:
        raise ValueError(
            f"{len(bad)} example(s) have a label outside the task's labels {list(labels)} "
            f"(first: {bad[0]}); a classifier student learns only those"
        )
    texts = [ex.input if ex.input is not None else "" for ex in examples]
    full = tokenizer(texts, truncation=False)["input_ids"]
    out, cut = [], 0
    for ex, ids in zip(examples, full, strict=True):
        if len(ids) > max_seq_len:
            cut += 1
            # Keep the end's special token (e.g. BERT's [SEP]) after the cut.
            last = ids[-1] if ids[-1] in tokenizer.all_special_ids else None
            ids = ids[: max_seq_len - 1] + [last] if last is not None else ids[:max_seq_len]
        out.append({"input_ids": ids, "labels": index[ex.label]})
    return out, cut


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Indices into a window of examples, in batches of similar length (sorted, then cut into
    `batch_size` runs), the batches in a random order: far less padding than random batches
    (on the Jigsaw comments, about half the tokens of random batches), while every example is
    still seen once."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def pad_batch(
    input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | Sequence[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sequence: padded positions are masked out of attention
    and of the loss. `labels` per token (causal LM) or one class index per example
    (classifier)."""
    import numpy as np
    import torch

    n, longest = len(input_ids), max(len(s) for s in input_ids)
    ids = torch.full((n, longest), pad_id, dtype=torch.long)
    att = torch.zeros((n, longest), dtype=torch.long)
    if len(labels) and np.ndim(labels[0]) == 0:
        # A classifier's labels: one class index per example.
        for i, s in enumerate(input_ids):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            att[i, : len(s)] = 1
        classes = torch.tensor(np.asarray(labels, dtype=np.int64))
        return {"input_ids": ids, "attention_mask": att, "labels": classes}
    lab = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    for i, (s, lb) in enumerate(zip(input_ids, labels, strict=True)):
        # torch.tensor copies: Ray hands over read-only numpy arrays.
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        lab[i, : len(lb)] = torch.tensor(lb, dtype=torch.long)
        att[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": att, "labels": lab}
