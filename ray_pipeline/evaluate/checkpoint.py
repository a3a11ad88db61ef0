"""Evaluate any student checkpoint on any labelled file, with no run folder and no Ray:
``distill evaluate CHECKPOINT --data FILE --text-column C --label-column L [--json]``.

The checkpoint carries what it needs (its labels, label key, aliases and the task prompt): each
text is put into that prompt exactly as in training, answered by ``Student.answer`` and parsed
like a teacher's answer. The file is CSV, JSONL or Parquet (by extension).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ray_pipeline.data.prompts import Prompt
from ray_pipeline.data.schema import normalize_label
from ray_pipeline.data.sources import read_records
from ray_pipeline.evaluate.metrics import classification_metrics
from ray_pipeline.teacher.parse import parse_answer

log = logging.getLogger("distill.evaluate")


def labelled_texts(
    path: str | Path,
    text_column: str,
    label_column: str,
    labels: list[str],
    aliases: dict[str, str],
    limit: int | None = None,
) -> tuple[list[str], list[str]]:
    """(texts, gold labels) of a file; a record without text, without a label or with a
    label not among `labels` is an error naming the file, the record and the column."""
    records = read_records(path)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"{path}: no records to evaluate on")
    texts, gold = [], []
    for i, rec in enumerate(records, 1):
        if text_column not in rec or label_column not in rec:
            missing = [c for c in (text_column, label_column) if c not in rec]
            raise ValueError(f"{path}: record {i} has no column(s) {missing}; it has {sorted(rec)}")
        text = rec[text_column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: record {i} has no text in column {text_column!r}")
        label = normalize_label(rec[label_column], labels, aliases)
        if label is None:
            raise ValueError(
                f"{path}: record {i}: label {rec[label_column]!r} in column {label_column!r} "
                f"is not one of the checkpoint's labels {labels}"
            )
        texts.append(text)
        gold.append(label)
    return texts, gold


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    text_column: str,
    label_column: str,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    limit: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The checkpoint's metrics on the file (``classification_metrics``: accuracy, balanced
    accuracy, per class, confusion, ROC-AUC for a classifier) plus where they came from."""
    from ray_pipeline.train.student import Student

    started = time.perf_counter()
    student = Student.load(checkpoint, device=device)
    meta = student.meta
    if "labels" not in meta or "prompt" not in meta:
        raise ValueError(
            f"{checkpoint}: its distill_checkpoint.json has no task labels/prompt; only label "
            "tasks' checkpoints can be scored against a label column"
        )
    labels, aliases = meta["labels"], meta.get("label_aliases", {})
    texts, gold = labelled_texts(data, text_column, label_column, labels, aliases, limit)
    p = meta["prompt"]
    prompt = Prompt(p["template"], p["placeholder"], p.get("system"))
    predicted: list[str | None] = []
    probs: list[dict[str, float]] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        answers = student.answer(
            [prompt.messages(t) for t in chunk],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        for a in answers:
            predicted.append(parse_answer(a.text, meta["label_key"], labels, aliases).label)
            if a.probs is not None:
                probs.append(a.probs)
        log.info("evaluate: %d of %d rows answered", len(predicted), len(texts))
    metrics = classification_metrics(
        gold, predicted, labels, probs if len(probs) == len(texts) else None
    )
    return {
        **metrics,
        "checkpoint": str(Path(checkpoint).absolute()),
        "data": str(Path(data).absolute()),
        "kind": student.kind,
        "threshold": meta.get("threshold"),
        "seconds": round(time.perf_counter() - started, 2),
    }
