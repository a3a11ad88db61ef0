"""Parsing the teacher's structured answers.

Real teachers answer with JSON, a python-dict literal, either of them inside a markdown fence,
with prose around it, or with a dict whose string values are not quoted (the Jigsaw CoT
responses do all of these). Parsing tries, in order: each fenced block, the whole text, the
first balanced {...}/[...] span; each as JSON, then as a python literal. When all fail, the
label alone is recovered by a key regex (``mode='regex'``) rather than losing the row.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ray_pipeline.config import TaskSection
from ray_pipeline.data.schema import FAILED, OK, dumps, normalize_label, to_table

_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\n?(.*?)```", re.S)


class ParseError(ValueError):
    pass


@dataclass(frozen=True)
class ParsedAnswer:
    output: Any  # the parsed object or, for a free-text answer, the text (None: nothing parsed)
    label: str | None  # the normalised label (None when missing or not allowed)
    error: str | None  # why output or label is missing
    mode: str  # json | python | regex | none


def _balanced_span(text: str) -> str | None:
    """The first balanced {...} or [...] span, ignoring brackets inside quoted strings."""
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        return None
    start = min(starts)
    open_c = text[start]
    close_c = "}" if open_c == "{" else "]"
    depth, quote, escaped = 0, None, False
    for i in range(start, len(text)):
        c = text[i]
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == open_c:
            depth += 1
        elif c == close_c:
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def parse_structured(text: str) -> tuple[Any, str]:
    """Parse a JSON / python-literal value out of free text; returns (value, mode)."""
    if not isinstance(text, str) or not text.strip():
        raise ParseError("empty answer")
    candidates = [m.group(1).strip() for m in _FENCE.finditer(text)]
    candidates.append(text.strip())
    span = _balanced_span(text)
    if span is not None:
        candidates.append(span)
    for cand in candidates:
        if not cand:
            continue
        for loader, mode in ((json.loads, "json"), (ast.literal_eval, "python")):
            try:
                return loader(cand), mode
            except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
                continue  # not this kind of literal: try the next loader / candidate
    raise ParseError(f"no JSON or python literal found in: {text[:120]!r}")


def label_pattern(label_key: str) -> re.Pattern:
    """``key: value``, ``"key": value``, ``'key'=value`` ..., the value in group 1: how a label
    is found where nothing parses, and where the simulator puts its label token."""
    return re.compile(
        r"['\"]?" + re.escape(label_key) + r"['\"]?\s*[:=]\s*['\"]?([A-Za-z0-9_.\-]+)"
    )


def parse_answer(
    text: str, label_key: str, labels: list[str], aliases: dict[str, str]
) -> ParsedAnswer:
    try:
        obj, mode = parse_structured(text)
    except ParseError as e:
        m = label_pattern(label_key).search(text or "")
        if m is None:
            return ParsedAnswer(None, None, f"parse_error: {e}", "none")
        obj, mode = {label_key: m.group(1)}, "regex"
    if not isinstance(obj, dict):
        return ParsedAnswer(
            None, None, f"parse_error: answer is a {type(obj).__name__}, not an object", mode
        )
    if label_key not in obj:
        return ParsedAnswer(obj, None, f"missing_label: answer has no key {label_key!r}", mode)
    label = normalize_label(obj[label_key], labels, aliases)
    if label is None:
        return ParsedAnswer(
            obj, None, f"invalid_label: {obj[label_key]!r} is not one of {labels}", mode
        )
    return ParsedAnswer(obj, label, None, mode)


def parse_generative(text: str, schema: dict[str, Any] | None) -> ParsedAnswer:
    """A generative task's answer: with an output schema, the JSON value in it (checked
    against the schema later, in curation: a violation is filtered with its reason, an answer
    with no value in it fails here); without one, the text itself, stripped."""
    if not isinstance(text, str) or not text.strip():
        return ParsedAnswer(None, None, "parse_error: empty answer", "none")
    if schema is None:
        return ParsedAnswer(text.strip(), None, None, "text")
    try:
        value, mode = parse_structured(text)
    except ParseError as e:
        return ParsedAnswer(None, None, f"parse_error: {e}", "none")
    return ParsedAnswer(value, None, None, mode)


def parse_list(text: str) -> list[str]:
    """A list of strings from an answer (JSON/python list; else one item per non-empty line)."""
    try:
        obj, _ = parse_structured(text)
    except ParseError:
        obj = None
    if isinstance(obj, list):
        return [str(x).strip() for x in obj if str(x).strip()]
    lines = [re.sub(r"^\s*(?:[-*]|\d+[.)])\s*", "", ln).strip() for ln in (text or "").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("```")]


def parse_rows(rows: list[dict[str, Any]], task: TaskSection) -> list[dict[str, Any]]:
    """Parse each answered row's response into ``output`` and ``label``. An answer with no
    structured value in it fails the row; a parsed answer without a valid label keeps
    ``label`` empty for curation to filter with its reason. A generative task's rows get
    ``output`` alone (``parse_generative``)."""
    for row in rows:
        if row["status"] != OK or row["response"] is None or row["output"] is not None:
            continue
        if task.generative:
            parsed = parse_generative(row["response"], task.output_schema)
            if parsed.output is None:
                row.update(status=FAILED, reason=parsed.error)
            else:
                row["output"] = dumps(parsed.output)
            continue
        if row["votes"] is not None:
            votes = json.loads(row["votes"])
            for v in votes:
                if v.get("response") is not None:
                    v["label"] = parse_answer(
                        v["response"], task.label_key, task.labels, task.label_aliases
                    ).label
            row["votes"] = dumps(votes)
        parsed = parse_answer(row["response"], task.label_key, task.labels, task.label_aliases)
        if parsed.output is None:
            row.update(status=FAILED, reason=parsed.error)
            continue
        row.update(output=dumps(parsed.output), label=parsed.label)
    return rows


def parse_batch(batch: pa.Table, task: TaskSection) -> pa.Table:
    """``parse_rows`` over a Ray Data batch."""
    return to_table(parse_rows(batch.to_pylist(), task))
