"""The configured test sets as rows: what evaluation scores and serving smoke-tests on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray_pipeline.config import DistillConfig, EvalSetSection
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.data.schema import dumps, new_row, normalize_label, row_id
from ray_pipeline.data.sources import read_texts


def built_test_sets(frozen: str | Path) -> list[EvalSetSection]:
    """The test sets curate built in a run (its dataset/test_sets/frozen.json) as evaluation
    sets: input in ``input``, the gold label (a generative task: the reference) in ``label``."""
    frozen = Path(frozen)
    sets = json.loads(frozen.read_text())["test_sets"]
    return [EvalSetSection(name=s["name"], path=frozen.parent / s["file"]) for s in sets]


def test_set_rows(
    cfg: DistillConfig, extra: list[EvalSetSection] | tuple[EvalSetSection, ...] = ()
) -> list[dict[str, Any]]:
    """One row per test example of evaluate.test_sets and `extra` (e.g. ``built_test_sets``),
    in the row schema (split='test', source=test set name); a missing or unknown gold label
    is an error naming the file and record. A generative task's gold is the reference
    answer, kept as written (a JSON value that is not a string as its JSON)."""
    sets = [*cfg.evaluate.test_sets, *extra]
    if not sets:
        raise ValueError(
            "evaluate.test_sets is empty and curate built none: there is nothing to evaluate on"
        )
    names = [ts.name for ts in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"test set names must be distinct, got {names}")
    prompt = Prompt.from_task(cfg.task)
    rows = []
    for ts in sets:
        for i, rec in enumerate(read_texts(ts.path, ts.input_field, ts.limit), 1):
            if rec.get(ts.gold_field) in (None, ""):
                raise ValueError(
                    f"{ts.path}: record {i} has no gold label in field {ts.gold_field!r}"
                )
            gold = _gold(cfg, rec[ts.gold_field])
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


def _gold(cfg: DistillConfig, value: Any) -> str | None:
    if cfg.task.generative:
        return value if isinstance(value, str) else dumps(value)
    return normalize_label(value, cfg.task.labels, cfg.task.label_aliases)
