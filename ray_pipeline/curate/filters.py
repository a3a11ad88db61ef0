"""Quality filters: plain classes over lists of row dicts.

A filter never drops a row: it sets ``status='filtered'`` and a ``reason`` naming the filter
and the evidence (``too_short: 3 chars < 5``), so the dataset's side table tells why each row
is not trained on. Rows that are not ``ok`` pass through untouched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from ray_pipeline.config import CurateSection, TaskSection
from ray_pipeline.data.schema import FILTERED, OK
from ray_pipeline.teacher.parse import parse_answer


def normalize_text(text: str) -> str:
    """The key two inputs share when they differ only in case and whitespace."""
    return " ".join(text.lower().split())


def _filter(row: dict[str, Any], reason: str) -> None:
    row["status"] = FILTERED
    row["reason"] = reason


class RuleFilter:
    """Length limits on input and answer, and excluded regex patterns on the input."""

    def __init__(self, cfg: CurateSection):
        self.cfg = cfg
        self.patterns = [re.compile(p) for p in cfg.exclude_patterns]

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        c = self.cfg
        for row in rows:
            if row["status"] != OK:
                continue
            n = len(row["input"] or "")
            if n < c.min_chars:
                _filter(row, f"too_short: {n} chars < {c.min_chars}")
            elif n > c.max_chars:
                _filter(row, f"too_long: {n} chars > {c.max_chars}")
            elif len(row["response"] or "") > c.max_response_chars:
                _filter(
                    row, f"response_too_long: {len(row['response'])} chars > {c.max_response_chars}"
                )
            else:
                hit = next((p.pattern for p in self.patterns if p.search(row["input"])), None)
                if hit is not None:
                    _filter(row, f"excluded_pattern: {hit}")
        return rows


class LabelFilter:
    """The parse-failure filter: an answer that parsed but has no valid label is not
    trainable; the reason says what was wrong (key missing, value not an allowed label)."""

    def __init__(self, task: TaskSection):
        self.task = task

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        t = self.task
        for row in rows:
            if row["status"] != OK or row["label"] is not None:
                continue
            if row["response"] is None:
                _filter(row, "no_answer: the row has no teacher response")
                continue
            parsed = parse_answer(row["response"], t.label_key, t.labels, t.label_aliases)
            _filter(row, parsed.error or "invalid_label")
        return rows


class TestOverlapFilter:
    """Training rows whose input is in a test set would inflate the scores: filter them."""

    __test__ = False  # not a pytest test class

    def __init__(self, test_inputs: dict[str, str]):
        self.test_inputs = test_inputs  # normalised input -> test set name

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in rows:
            if row["status"] == OK and row["input"] is not None:
                name = self.test_inputs.get(normalize_text(row["input"]))
                if name is not None:
                    _filter(row, f"test_overlap: input is in test set '{name}'")
        return rows


def _record_key(r: dict[str, Any]) -> tuple[str, int]:
    # (source, line) names one input record even when a file repeats an input verbatim
    # (the two records then share an id, which hashes source + input).
    return (r["source"] or "", r["source_line"] if r["source_line"] is not None else -1)


def find_exact_duplicates(records: Iterable[dict[str, Any]]) -> dict[tuple[str, int], str]:
    """{(source, line) of a duplicate: id of the row it repeats}. Among rows with the same
    normalised input the first by (source, line) is kept, so the choice is deterministic."""
    ordered = sorted(
        (r for r in records if r["status"] == OK and r["input"] is not None), key=_record_key
    )
    first: dict[str, str] = {}
    dups: dict[tuple[str, int], str] = {}
    for r in ordered:
        key = normalize_text(r["input"])
        if key in first:
            dups[_record_key(r)] = first[key]
        else:
            first[key] = r["id"]
    return dups


class MarkDuplicates:
    def __init__(self, duplicates: dict[tuple[str, int], str]):
        self.duplicates = duplicates

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in rows:
            original = self.duplicates.get(_record_key(row)) if row["status"] == OK else None
            if original is not None:
                _filter(row, f"duplicate: same input as row {original}")
        return rows
