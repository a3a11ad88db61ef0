"""The configured test sets as rows: what evaluation scores and serving smoke-tests on."""

from __future__ import annotations

from typing import Any

from ray_pipeline.config import DistillConfig
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.data.schema import dumps, new_row, normalize_label, row_id
from ray_pipeline.data.sources import read_texts


def test_set_rows(cfg: DistillConfig) -> list[dict[str, Any]]:
    """One row per test example, in the row schema (split='test', source=test set name);
    a missing or unknown gold label is an error naming the file and record."""
    if not cfg.evaluate.test_sets:
        raise ValueError("evaluate.test_sets is empty: there is nothing to evaluate on")
    prompt = Prompt.from_task(cfg.task)
    rows = []
    for ts in cfg.evaluate.test_sets:
        for i, rec in enumerate(read_texts(ts.path, ts.input_field, ts.limit), 1):
            if rec.get(ts.gold_field) in (None, ""):
                raise ValueError(
                    f"{ts.path}: record {i} has no gold label in field {ts.gold_field!r}"
                )
            gold = normalize_label(rec[ts.gold_field], cfg.task.labels, cfg.task.label_aliases)
            if gold is None:
                raise ValueError(
                    f"{ts.path}: record {i}: gold label {rec[ts.gold_field]!r} is not one of "
                    f"{cfg.task.labels}"
                )
            text = rec[ts.input_field]
            rows.append(
                new_row(
                    id=row_id(ts.name, text),
                    source=ts.name,
                    source_line=i,
                    input=text,
                    messages=dumps(prompt.messages(text)),
                    prompt_hash=prompt.hash,
                    gold=gold,
                    split="test",
                )
            )
    return rows
