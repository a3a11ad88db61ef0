"""Reading inputs: production logs, seed examples and test sets (JSONL, CSV or Parquet).

Every record of a log becomes exactly one row. A line that cannot be read (bad JSON, a CSV
record with the wrong number of fields, a missing input field) becomes a ``failed`` row that
keeps its file, line number, the error and the start of the raw text: it is counted and
written aside, and it never stops the run.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ray_pipeline.config import LogSource, TaskSection
from ray_pipeline.data.schema import FAILED, dumps, new_row, row_id
from ray_pipeline.teacher.parse import normalize_label
from ray_pipeline.teacher.prompts import Prompt, last_user_content

MALFORMED = "malformed_record"
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}

# CSV cells in real logs (long comments) exceed the csv module's 128 KiB default.
csv.field_size_limit(2**31 - 1)


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ValueError(
            f"{path}: cannot tell the format from the extension {suffix!r}; "
            f"set format: jsonl|csv|parquet"
        )
    return _EXTENSIONS[suffix]


def iter_records(
    data: bytes, fmt: str
) -> Iterator[tuple[int, dict[str, Any] | None, str | None, str]]:
    """Yield (line_or_record_number, record or None, error or None, raw text excerpt)."""
    if fmt == "parquet":
        table = pq.read_table(io.BytesIO(data))
        for i, rec in enumerate(table.to_pylist(), 1):
            yield i, rec, None, ""
        return
    text = data.decode("utf-8", errors="replace")
    if fmt == "jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield i, None, f"invalid JSON: {e}", line[:500]
                continue
            if not isinstance(rec, dict):
                yield i, None, f"expected a JSON object, got {type(rec).__name__}", line[:500]
                continue
            yield i, rec, None, line[:500]
        return
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        start = 2  # the first record starts on the line after the header
        for rec in reader:
            line = start
            start = reader.line_num + 1
            if None in rec:
                yield (
                    line,
                    None,
                    f"{len(reader.fieldnames) + len(rec[None])} fields, header has {len(reader.fieldnames)}",
                    str(rec[None])[:500],
                )
                continue
            missing = [k for k, v in rec.items() if v is None]
            if missing:
                yield line, None, f"missing fields {missing}", ""
                continue
            yield line, rec, None, ""
        return
    raise ValueError(f"unknown format {fmt!r}")


def _is_openai_record(rec: dict[str, Any]) -> bool:
    req = rec.get("request")
    return isinstance(req, dict) and isinstance(req.get("messages"), list)


def _openai_fields(rec: dict[str, Any], prompt: Prompt) -> dict[str, Any]:
    """Row fields from an OpenAI chat-completion style record {'request':..., 'response':...}."""
    messages = rec["request"]["messages"]
    user = last_user_content(messages)
    if user is None:
        raise ValueError("request.messages has no user message with text content")
    extracted = prompt.extract(user)
    fields: dict[str, Any] = {
        "input": extracted if extracted is not None else user,
        "messages": dumps(messages),
        "prompt_hash": prompt.hash if extracted is not None else None,
    }
    resp = rec.get("response")
    # The router's request log holds answers of the student too: only a teacher's answer is
    # a label to learn from; a student-served request goes back to the teacher.
    if rec.get("served_by", "teacher") != "teacher":
        resp = None
    if isinstance(resp, dict) and resp.get("choices"):
        content = (resp["choices"][0].get("message") or {}).get("content")
        if isinstance(content, str) and content.strip():
            usage = resp.get("usage") or {}
            fields.update(
                response=content,
                teacher=resp.get("model") or rec["request"].get("model") or "recorded",
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=usage.get("completion_tokens"),
            )
    return fields


def log_rows(
    data: bytes, path: str, src: LogSource, prompt: Prompt, task: TaskSection
) -> list[dict[str, Any]]:
    """All rows of one log file: one per record, malformed ones as failed rows."""
    fmt = detect_format(path, src.format)
    rows: list[dict[str, Any]] = []
    for line, rec, error, raw in iter_records(data, fmt):
        if src.limit is not None and len(rows) >= src.limit:
            break
        if error is None:
            try:
                fields = _record_fields(rec, src, prompt, task)
            except ValueError as e:
                error = str(e)
        if error is not None:
            rows.append(
                new_row(
                    id=row_id(path, f"line:{line}"),
                    source=path,
                    source_line=line,
                    input=raw or None,
                    status=FAILED,
                    reason=f"{MALFORMED}: {error}",
                )
            )
            continue
        rows.append(
            new_row(id=row_id(path, fields["input"]), source=path, source_line=line, **fields)
        )
    return rows


def _record_fields(
    rec: dict[str, Any], src: LogSource, prompt: Prompt, task: TaskSection
) -> dict[str, Any]:
    if _is_openai_record(rec):
        fields = _openai_fields(rec, prompt)
    else:
        text = rec.get(src.input_field)
        if not isinstance(text, str) or not text.strip():
            present = ", ".join(sorted(rec)[:10])
            raise ValueError(f"no text in field {src.input_field!r} (fields: {present})")
        fields = {
            "input": text,
            "messages": dumps(prompt.messages(text)),
            "prompt_hash": prompt.hash,
        }
        if src.response_field is not None:
            resp = rec.get(src.response_field)
            if isinstance(resp, str) and resp.strip():
                fields.update(response=resp, teacher=f"recorded:{src.response_field}")
    if src.gold_field is not None and rec.get(src.gold_field) not in (None, ""):
        gold = rec[src.gold_field]
        fields["gold"] = normalize_label(gold, task.labels, task.label_aliases) or str(gold)
    return fields


def read_records(path: str | Path, fmt: str = "auto") -> list[dict[str, Any]]:
    """All well-formed records of a small file (seeds, test sets); raises on a malformed one."""
    records = []
    for line, rec, error, _ in iter_records(Path(path).read_bytes(), detect_format(path, fmt)):
        if error is not None:
            raise ValueError(f"{path}:{line}: {error}")
        records.append(rec)
    return records


def read_texts(path: str | Path, field: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Records of a small file that must all carry text in `field` (seeds, test sets)."""
    records = read_records(path)[:limit] if limit else read_records(path)
    for i, rec in enumerate(records, 1):
        if not isinstance(rec.get(field), str) or not rec[field].strip():
            raise ValueError(f"{path}: record {i} has no text in field {field!r}")
    return records
