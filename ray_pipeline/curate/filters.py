"""Row filters: plain classes over lists of row dicts, one row at a time.

A filter never drops a row: it sets ``status='filtered'`` and a ``reason`` naming the filter
and the evidence (``too_short: 3 chars < 5``), so the dataset's side table tells why each row
is not trained on. Rows that are not ``ok`` pass through untouched, so the first reason a row
meets is the one it keeps.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from ray_pipeline.config import RulesSection, TaskSection
from ray_pipeline.curate.dedup import TestIndex, normalize_text
from ray_pipeline.data.schema import FILTERED, OK
from ray_pipeline.teacher.parse import parse_answer

_EVIDENCE = 60  # characters of matched text quoted in a reason


def filter_row(row: dict[str, Any], reason: str) -> None:
    row["status"] = FILTERED
    row["reason"] = reason


def _quote(text: str) -> str:
    return repr(text if len(text) <= _EVIDENCE else text[:_EVIDENCE] + "...")


@functools.lru_cache(maxsize=2)
def load_tokenizer(source: str) -> Any:
    """The student's tokenizer, loaded once per worker process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


class LabelFilter:
    """The parse-failure filter: an answer that parsed but has no valid label is not
    trainable; the reason says what was wrong (key missing, value not an allowed label). A
    generative task's rows need a parsed answer (``output``), not a label."""

    def __init__(self, task: TaskSection):
        self.task = task

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        t = self.task
        for row in rows:
            if row["status"] != OK or row["label"] is not None:
                continue
            if t.generative and row["output"] is not None:
                continue
            if row["response"] is None:
                filter_row(row, "no_answer: the row has no teacher response")
                continue
            if t.generative:
                filter_row(row, "parse_error: the answer was never parsed")
                continue
            parsed = parse_answer(row["response"], t.label_key, t.labels, t.label_aliases)
            filter_row(row, parsed.error or "invalid_label")
        return rows


class GoldFilter:
    """A gold label outside the task's labels is a broken record, not a disagreement."""

    def __init__(self, task: TaskSection):
        self.labels = task.labels

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.labels is None:  # a generative task's gold is a reference answer
            return rows
        for row in rows:
            if row["status"] == OK and row["gold"] is not None and row["gold"] not in self.labels:
                filter_row(row, f"invalid_gold: {row['gold']!r} is not one of {self.labels}")
        return rows


class RuleFilter:
    """Length limits (characters, and tokens of the student's tokenizer), regex deny/allow
    lists on the input and deny list on the answer, refusals and boilerplate, empty answers,
    answers that echo the input, and the answer's JSON Schema (curate.rules.output_schema,
    and a generative task's own task.output_schema: `answer_schema`)."""

    def __init__(
        self, rules: RulesSection, tokenizer: Any = None, answer_schema: dict | None = None
    ):
        if rules.uses_tokens and tokenizer is None:
            raise ValueError("curate.rules has token limits: give the student's tokenizer")
        self.rules = rules
        self.tokenizer = tokenizer
        self.deny = [re.compile(p) for p in rules.deny_patterns]
        self.allow = [re.compile(p) for p in rules.allow_patterns]
        self.answer_deny = [re.compile(p) for p in rules.response_deny_patterns]
        self.refusals = [re.compile(p) for p in rules.refusal_patterns]
        import jsonschema

        self.schemas = [
            jsonschema.Draft202012Validator(schema)
            for schema in (answer_schema, rules.output_schema)
            if schema is not None
        ]

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in rows:
            if row["status"] != OK:
                continue
            reason = self.check(row)
            if reason is not None:
                filter_row(row, reason)
        if self.tokenizer is not None:
            self._check_tokens(rows)
        return rows

    def check(self, row: dict[str, Any]) -> str | None:
        """Why the row breaks a rule (the first rule it breaks), or None. Token limits are
        checked per batch (``_check_tokens``)."""
        r = self.rules
        text, answer = row["input"] or "", row["response"] or ""
        n = len(text)
        if not text.strip():
            return "empty_input: the input has no text"
        if n < r.min_chars:
            return f"too_short: {n} chars < {r.min_chars}"
        if n > r.max_chars:
            return f"too_long: {n} chars > {r.max_chars}"
        if not answer.strip():
            return "empty_answer: the teacher's answer has no text"
        if len(answer) > r.max_response_chars:
            return f"response_too_long: {len(answer)} chars > {r.max_response_chars}"
        hit = next((p.pattern for p in self.deny if p.search(text)), None)
        if hit is not None:
            return f"excluded_pattern: {hit}"
        if self.allow and not any(p.search(text) for p in self.allow):
            return f"not_allowed: the input matches none of {len(self.allow)} allow_patterns"
        for p in self.answer_deny:
            m = p.search(answer)
            if m is not None:
                return f"excluded_answer: {_quote(m.group())} matches {p.pattern}"
        for p in self.refusals:
            m = p.search(answer)
            if m is not None:
                return f"refusal: {_quote(m.group())} in the answer"
        if r.echo_min_chars is not None and n >= r.echo_min_chars:
            key = normalize_text(text)
            if len(key) >= r.echo_min_chars and key in normalize_text(answer):
                return f"prompt_echo: the answer repeats the {n}-char input"
        for schema in self.schemas:
            error = self._schema_error(row, schema)
            if error is not None:
                return error
        return None

    def _schema_error(self, row: dict[str, Any], schema: Any) -> str | None:
        import jsonschema

        if row["output"] is None:
            return "schema_invalid: the answer did not parse into a value"
        error = jsonschema.exceptions.best_match(schema.iter_errors(json.loads(row["output"])))
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path) or "the answer"
        return f"schema_invalid: {where}: {error.message}"

    def _check_tokens(self, rows: list[dict[str, Any]]) -> None:
        r = self.rules
        live = [row for row in rows if row["status"] == OK]
        if not live:
            return
        tok = self.tokenizer
        inputs = tok([row["input"] for row in live], add_special_tokens=False)["input_ids"]
        answers = None
        if r.max_response_tokens is not None:
            answers = tok([row["response"] for row in live], add_special_tokens=False)["input_ids"]
        for i, row in enumerate(live):
            n = len(inputs[i])
            if r.min_tokens is not None and n < r.min_tokens:
                filter_row(row, f"too_few_tokens: {n} tokens < {r.min_tokens}")
            elif r.max_tokens is not None and n > r.max_tokens:
                filter_row(row, f"too_many_tokens: {n} tokens > {r.max_tokens}")
            elif answers is not None and len(answers[i]) > r.max_response_tokens:
                filter_row(
                    row,
                    f"response_too_many_tokens: {len(answers[i])} tokens > {r.max_response_tokens}",
                )


class TestOverlapFilter:
    """Training rows whose input is in a test set (exactly, or as a near-duplicate when the
    index has a near threshold) would inflate the scores: filter them (reason
    ``test_overlap``); the stage refuses the dataset instead when told to."""

    __test__ = False  # not a pytest test class

    def __init__(self, index: TestIndex):
        self.index = index

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        live = [r for r in rows if r["status"] == OK and r["input"] is not None]
        for row, hit in zip(live, self.index.lookup([r["input"] for r in live]), strict=True):
            if hit is not None:
                filter_row(row, f"test_overlap: {hit}")
        return rows
