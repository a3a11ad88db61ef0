"""The one row schema every stage reads and writes.

A row is a plain dict with exactly the keys of ``ROW_SCHEMA``; in Ray Data it travels as a
pyarrow table of that schema. Nothing is dropped: a row that does not make it into the
training set keeps ``status`` = ``filtered`` or ``failed`` and a ``reason``.

Nested values (chat messages, the parsed answer, scores, votes) are JSON strings, so that every
Parquet file of every run has the same flat, stable schema whatever the task.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

OK, FILTERED, FAILED = "ok", "filtered", "failed"

ROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # hash of source + input
        pa.field("source", pa.string()),  # file path, or "seeds:<path>" for synthetic inputs
        pa.field("source_line", pa.int64()),  # line (JSONL/CSV) or record number (Parquet)
        pa.field("input", pa.string()),  # the raw input text (e.g. the comment)
        pa.field("messages", pa.string()),  # JSON list of chat messages sent to the teacher
        pa.field("teacher", pa.string()),  # model that answered (or "log:<path>" when recorded)
        pa.field("prompt_hash", pa.string()),  # hash of the prompt template + system message
        pa.field("response", pa.string()),  # raw teacher answer text
        # JSON of the answer's token logprobs when the teacher was asked for them
        # (teacher.top_logprobs): [{"token", "logprob", "top": [[token, logprob], ...]}];
        # null when not asked, not returned, or recorded in a log.
        pa.field("teacher_logprobs", pa.string()),
        pa.field("output", pa.string()),  # parsed answer, as JSON
        pa.field("label", pa.string()),  # normalised label from the answer
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("cost", pa.float64()),  # USD
        pa.field("latency_s", pa.float64()),
        pa.field("attempts", pa.int64()),
        pa.field("cached", pa.bool_()),
        pa.field("status", pa.string(), nullable=False),  # ok | filtered | failed
        pa.field("reason", pa.string()),  # why filtered/failed (null when ok)
        pa.field("error_class", pa.string()),  # exception class of a failed teacher call
        pa.field("status_code", pa.int64()),  # HTTP status of a failed teacher call
        pa.field("scores", pa.string()),  # JSON, e.g. judge scores
        pa.field("votes", pa.string()),  # JSON, e.g. labels from several teachers
        pa.field("gold", pa.string()),  # human gold label, normalised like `label`
        pa.field("user", pa.string()),  # who sent the request (data.logs[].user_field)
        pa.field("split", pa.string()),  # train | val | test
    ]
)
COLUMNS = tuple(ROW_SCHEMA.names)


def row_id(source: str, text: str) -> str:
    """Stable id of an input: the same input from the same source always gets the same id."""
    return hashlib.sha256(f"{source}\x00{text}".encode()).hexdigest()[:16]


def new_row(**fields: Any) -> dict[str, Any]:
    """A row with every schema key; unknown keys are a programming error."""
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not in the row schema: {sorted(unknown)}")
    row = dict.fromkeys(COLUMNS)
    row.update(fields)
    if row["status"] is None:
        row["status"] = OK
    return row


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def dumps(value: Any) -> str:
    """JSON text of a nested value, keys in their original order (a chain-of-thought answer
    keeps its reasons before its verdict)."""
    return json.dumps(value, ensure_ascii=False)


def answer_json(label_key: str, label: str) -> str:
    """The canonical answer of a label, as the teacher writes it: ``{"toxic": 1}`` (a label
    that is a whole number is written as a number)."""
    value: Any = int(label) if label.lstrip("-").isdigit() else label
    return dumps({label_key: value})


def answer_text(output: str) -> str:
    """An answer as text, from its ``output`` (JSON): a text answer (a generative task without
    an output schema) is the text itself, a structured one its JSON as stored. What the
    student learns (train.target: canonical) and what is compared with a reference."""
    value = json.loads(output)
    return value if isinstance(value, str) else output


def normalize_label(value: Any, labels: list[str], aliases: dict[str, str]) -> str | None:
    """Map a raw label value to one of `labels` (as a string), or None if it is not one."""
    if isinstance(value, bool):
        raw = "true" if value else "false"
    elif isinstance(value, float) and value.is_integer():
        raw = str(int(value))
    else:
        raw = str(value).strip()
    lowered = {k.lower(): v for k, v in aliases.items()}
    raw = lowered.get(raw.lower(), raw)
    if raw in labels:
        return raw
    by_lower = {lab.lower(): lab for lab in labels}
    return by_lower.get(raw.lower())
