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

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

# The subsets' rule lives below the stages: curate records the subsets train trains on.
from ray_pipeline.data.schema import answer_text
from ray_pipeline.data.subsets import in_subset, stable_unit

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
    teacher_logprobs: str | None = None  # JSON token logprobs of the answer (distillation)
    source: str | None = None  # the log (or seeds file) the row came from


def load_examples(
    dataset_dir: str | Path,
    target: Literal["canonical", "raw"],
    only: set[str] | None = None,
) -> list[Example]:
    """The curated dataset (a Parquet dir in the row schema) as examples; with `only`, just
    the rows with those ids.

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
    table = pq.read_table(path, filters=[("id", "in", sorted(only))] if only else None)
    missing = {"id", "messages", column, "label", "input"} - set(table.column_names)
    if missing:
        raise ValueError(
            f"curated dataset {path} lacks column(s) {sorted(missing)} (train.target={target!r} "
            f"reads '{column}'); it must be in the row schema of ray_pipeline.data.schema"
        )
    sources = ["source"] if "source" in table.column_names else []
    rows = table.select(["id", "messages", column, "label", "input", *sources]).to_pylist()
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
                target=answer_text(r[column]) if target == "canonical" else r[column],
                label=r["label"],
                input=r["input"],
                source=r.get("source"),
            )
        )
    return out


def is_validation(row_id: str, val_fraction: float) -> bool:
    """Whether a row belongs to the validation split. By a hash of the id alone (no seed), so a
    row stays on its side across runs, sweeps and dataset growth."""
    return stable_unit("val", row_id) < val_fraction


def in_split(row_id: str, split: Literal["train", "val"], val_fraction: float) -> bool:
    """Whether a row is on the `split` side of ``is_validation``."""
    return is_validation(row_id, val_fraction) == (split == "val")


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
        cut = len(p) + len(a) + 1 > max_seq_len
        out.append({"input_ids": input_ids, "labels": labels, "truncated": cut})
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
        too_long = len(ids) > max_seq_len
        if too_long:
            cut += 1
            # Keep the end's special token (e.g. BERT's [SEP]) after the cut.
            last = ids[-1] if ids[-1] in tokenizer.all_special_ids else None
            ids = ids[: max_seq_len - 1] + [last] if last is not None else ids[:max_seq_len]
        out.append({"input_ids": ids, "labels": index[ex.label], "truncated": too_long})
    return out, cut


# The curated columns a training example is made of (see ``load_examples``).
EXAMPLE_COLUMNS = ("id", "messages", "output", "response", "label", "input", "teacher_logprobs")


def encode_rows(
    batch: dict[str, Any],
    *,
    split: Literal["train", "val"],
    val_fraction: float,
    tokenizer: Any,
    kind: str,
    max_seq_len: int,
    labels: Sequence[str],
    target: Literal["canonical", "raw"],
    fraction: float = 1.0,
    seed: int = 0,
    soft_targets: bool = False,
    aliases: dict[str, str] | None = None,
) -> dict[str, list]:
    """A batch of curated rows (columns EXAMPLE_COLUMNS, as Ray Data hands them to
    ``map_batches``) -> the rows of `split` (and, for train, of the `fraction` subset),
    tokenized: {"input_ids", "labels", "truncated"}. The Ray Data map of the train stage.

    With `soft_targets` (logit distillation) each row also carries the teacher's distribution
    from its teacher_logprobs (``soft_targets_of``)."""
    column = TARGET_COLUMNS[target]
    examples = []
    for i, row_id in enumerate(batch["id"]):
        row_id = str(row_id)
        if not in_split(row_id, split, val_fraction):
            continue
        if split == "train" and not in_subset(row_id, fraction, seed):
            continue
        if not batch[column][i] or not batch["messages"][i]:
            raise ValueError(
                f"curated row {row_id} has an empty '{column}' or 'messages' "
                f"(train.target={target!r}); curate keeps only answered rows, was it edited?"
            )
        examples.append(
            Example(
                id=row_id,
                messages=json.loads(batch["messages"][i]),
                target=answer_text(batch[column][i]) if target == "canonical" else batch[column][i],
                label=batch["label"][i],
                input=batch["input"][i],
                teacher_logprobs=batch["teacher_logprobs"][i] if soft_targets else None,
            )
        )
    keys = ["input_ids", "labels", "truncated", *(soft_columns(kind) if soft_targets else [])]
    if not examples:
        return {key: [] for key in keys}
    if kind == "classifier":
        encoded, _ = encode_classifier_examples(tokenizer, examples, max_seq_len, labels)
    else:
        encoded = encode_examples(tokenizer, examples, max_seq_len)
    if soft_targets:
        for ex, row in zip(examples, encoded, strict=True):
            row.update(soft_targets_of(ex, tokenizer, kind, labels, aliases or {}))
    return {key: [row[key] for row in encoded] for key in keys}


def soft_columns(kind: str) -> list[str]:
    """The columns ``soft_targets_of`` adds for a student kind."""
    if kind == "classifier":
        return ["soft_probs", "soft_mask"]
    return ["soft_ids", "soft_logprobs"]


def soft_targets_of(
    ex: Example, tokenizer: Any, kind: str, labels: Sequence[str], aliases: dict[str, str]
) -> dict[str, Any]:
    """An example's soft targets from its teacher_logprobs (none when it has no logprobs:
    a recorded log row learns from the cross-entropy alone).

    Classifier: {"soft_probs": the teacher's probability per label, "soft_mask"}. Causal LM:
    {"soft_ids", "soft_logprobs"}: per answer token the teacher's top-k as student token ids
    and logprobs (padded with -1 / 0.0 to the example's widest top-k); a teacher whose tokens
    are not the student's is an error naming the row (``soft_targets.token_alignment``)."""
    from ray_pipeline.train.soft_targets import label_distribution, token_alignment

    positions = json.loads(ex.teacher_logprobs) if ex.teacher_logprobs else None
    if kind == "classifier":
        probs = label_distribution(positions, labels, aliases) if positions else None
        return {"soft_probs": probs or [0.0] * len(labels), "soft_mask": probs is not None}
    if not positions:
        return {"soft_ids": [], "soft_logprobs": []}
    answer = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
    try:
        aligned = token_alignment(tokenizer, positions, answer)
    except ValueError as e:
        raise ValueError(
            f"row {ex.id}: {e}. Logit distillation needs a student that writes the teacher's "
            "own tokens (train.target: raw, and a tokenizer of the teacher's family); set "
            "train.distill.weight: 0 to train without it"
        ) from e
    width = max(len(p) for p in aligned)
    ids = [[t for t, _ in p] + [-1] * (width - len(p)) for p in aligned]
    logprobs = [[lp for _, lp in p] + [0.0] * (width - len(p)) for p in aligned]
    return {"soft_ids": ids, "soft_logprobs": logprobs}


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


def pack_examples(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Indices of examples packed into rows of at most `max_len` tokens, first-fit over the
    examples from longest to shortest (first-fit decreasing: within 22% of the fewest rows).
    Every example is in exactly one row, in the order packed."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > max_len:
            raise ValueError(f"example of {lengths[i]} tokens cannot be packed into {max_len}")
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_len - lengths[i])
    return rows


def pack_batch(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_id: int,
    max_len: int,
) -> dict[str, torch.Tensor]:
    """A causal-LM batch of examples packed into as few rows of at most `max_len` tokens as
    fit (``pack_examples``), instead of each padded to the longest.

    There is no attention_mask: position ids restart at 0 at each example, and transformers
    (``masking_utils.find_packed_sequence_indices``) then keeps attention within each example,
    so a packed example's logits equal its logits alone (tested). Each example's first label is
    masked, so no token is learnt from the example before it. The padding after a row's last
    example is a segment of its own (positions from 0 again), outside the loss.
    """
    import torch

    rows = pack_examples([len(s) for s in input_ids], max_len)
    longest = max(sum(len(input_ids[i]) for i in row) for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(input_ids[i])
            ids[r, at : at + n] = torch.tensor(input_ids[i], dtype=torch.long)
            lab[r, at : at + n] = torch.tensor(labels[i], dtype=torch.long)
            lab[r, at] = IGNORE_INDEX
            pos[r, at : at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(longest - at)
    return {"input_ids": ids, "labels": lab, "position_ids": pos}


@dataclass(frozen=True)
class BatchCounts:
    """What one batch holds: examples, their tokens (no padding), the loss targets (a causal
    LM's answer tokens after the causal shift; a classifier's examples), the examples cut at
    max_seq_len, and the positions computed (rows x length, padding included)."""

    examples: int
    tokens: int
    targets: int
    truncated: int
    positions: int


def collate(
    batch: dict[str, Any], pad_id: int, pack_to: int | None = None
) -> tuple[dict[str, torch.Tensor], BatchCounts]:
    """A batch of encoded examples ({"input_ids", "labels"[, "truncated"][, soft targets]})
    -> the model's tensors (padded, or packed into rows of `pack_to` tokens; soft targets as
    ``soft_*`` tensors beside them) and its counts."""
    import numpy as np
    import torch

    input_ids, labels = batch["input_ids"], batch["labels"]
    classifier = len(labels) > 0 and np.ndim(labels[0]) == 0
    if pack_to is not None and not classifier:
        tensors = pack_batch(input_ids, labels, pad_id, pack_to)
    else:
        tensors = pad_batch(input_ids, labels, pad_id)
    if classifier:
        targets = len(labels)
    else:
        targets = sum(int((np.asarray(lb[1:]) != IGNORE_INDEX).sum()) for lb in labels)
    if "soft_probs" in batch:
        tensors["soft_probs"] = torch.tensor(np.stack(batch["soft_probs"]), dtype=torch.float32)
        tensors["soft_mask"] = torch.tensor(np.asarray(batch["soft_mask"], dtype=bool))
    if "soft_ids" in batch:
        tensors.update(_token_soft_targets(input_ids, batch["soft_ids"], batch["soft_logprobs"]))
    counts = BatchCounts(
        examples=len(input_ids),
        tokens=sum(len(s) for s in input_ids),
        targets=targets,
        truncated=int(np.sum(batch["truncated"])) if "truncated" in batch else 0,
        positions=int(tensors["input_ids"].numel()),
    )
    return tensors, counts


def _token_soft_targets(
    input_ids: Sequence[Sequence[int]], soft_ids: Sequence[Any], soft_logprobs: Sequence[Any]
) -> dict[str, torch.Tensor]:
    """[B, L, K] tensors of each answer token's teacher top-k (ids -1 where none), at the
    answer tokens' positions in the right-padded batch: an example's answer (and its eos) ends
    its sequence, so its a soft positions are the a tokens before the last."""
    import numpy as np
    import torch

    width = max([len(row[0]) for row in soft_ids if len(row)] or [1])
    longest = max(len(s) for s in input_ids)
    ids = torch.full((len(input_ids), longest, width), -1, dtype=torch.long)
    logprobs = torch.zeros((len(input_ids), longest, width), dtype=torch.float32)
    for i, (seq, row_ids, row_lps) in enumerate(
        zip(input_ids, soft_ids, soft_logprobs, strict=True)
    ):
        if not len(row_ids):
            continue
        a = len(row_ids)
        end = len(seq) - 1  # the eos
        block_ids = np.stack([np.asarray(r) for r in row_ids])
        block_lps = np.stack([np.asarray(r) for r in row_lps])
        ids[i, end - a : end, : block_ids.shape[1]] = torch.from_numpy(block_ids.astype(np.int64))
        logprobs[i, end - a : end, : block_lps.shape[1]] = torch.from_numpy(
            block_lps.astype(np.float32)
        )
    return {"soft_ids": ids, "soft_logprobs": logprobs}
