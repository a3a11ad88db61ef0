"""Reading inputs: production logs, seed examples and test sets (JSONL, CSV or Parquet).

Files are read as streams, record by record, from an open binary file: a log far larger than
a worker's memory is read in blocks of ``data.block_rows`` rows (``log_blocks``), never whole.

Every record of a log becomes exactly one row. A record that cannot be read becomes a
``failed`` row that keeps its file, line number, the error and the start of the raw text; it
is counted and written aside, and it never stops the run:

* ``malformed_record``: not JSON, not an object, a CSV record with the wrong number of fields,
  no text in the input field;
* ``invalid_utf8``: bytes that are not UTF-8 (or a JSON string escaping a lone surrogate),
  never silently replaced.

JSONL is split on ``\\n`` only: U+2028, U+2029 and U+0085, which JSON allows raw inside
strings (and which the request log writes raw), stay inside their record. CSV records may span
lines (quoted newlines); their line number is the line they start on. Parquet records are
numbered from 1.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from ray_pipeline.config import LogSource, TaskSection
from ray_pipeline.data.prompts import Prompt, last_user_content
from ray_pipeline.data.schema import (
    FAILED,
    answer_json,
    dumps,
    new_row,
    normalize_label,
    row_id,
    to_table,
)
from ray_pipeline.storage import open_input

MALFORMED = "malformed_record"
INVALID_UTF8 = "invalid_utf8"
UNREADABLE = (MALFORMED, INVALID_UTF8)  # reasons of records that could not be read
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_EXCERPT = 500  # characters of a bad record kept for a person to read
# surrogateescape turns each byte that is not UTF-8 into one of these code points.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_SURROGATE = re.compile("[\ud800-\udfff]")

# CSV cells in real logs (long comments) exceed the csv module's 128 KiB default.
csv.field_size_limit(2**31 - 1)

# One record as read: (line or record number, the record or None, the error or None, an
# excerpt of the raw text for a record that could not be read).
Record = tuple[int, dict[str, Any] | None, str | None, str]


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


def iter_records(f: BinaryIO, fmt: str) -> Iterator[Record]:
    """Walk an open binary file record by record (see the module docstring)."""
    if fmt == "jsonl":
        return _jsonl_records(f)
    if fmt == "csv":
        return _csv_records(f)
    if fmt == "parquet":
        return _parquet_records(f)
    raise ValueError(f"unknown format {fmt!r}")


def _utf8_error(e: UnicodeDecodeError) -> str:
    return f"{INVALID_UTF8}: byte 0x{e.object[e.start]:02x} at byte {e.start + 1} is not UTF-8"


def _jsonl_records(f: BinaryIO) -> Iterator[Record]:
    # A binary file iterates on b"\n" only, one line in memory at a time.
    for i, raw in enumerate(f, 1):
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield i, None, _utf8_error(e), line.decode("utf-8", "replace")[:_EXCERPT]
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            yield i, None, f"{MALFORMED}: invalid JSON: {e}", text[:_EXCERPT]
            continue
        if not isinstance(rec, dict):
            error = f"{MALFORMED}: expected a JSON object, got {type(rec).__name__}"
            yield i, None, error, text[:_EXCERPT]
            continue
        yield i, rec, None, text[:_EXCERPT]


def _csv_records(f: BinaryIO) -> Iterator[Record]:
    # newline="": the csv module sees \r\n inside quoted cells as data, and splits records on
    # \n, \r and \r\n only (not on U+2028). Bytes that are not UTF-8 become lone surrogates,
    # found per record below.
    text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.DictReader(text)
    start = 2  # the first record starts on the line after the header
    for rec in reader:
        line = start
        start = reader.line_num + 1
        cells = [*rec.values(), *(rec.get(None) or [])]
        bad = next((c for c in cells if isinstance(c, str) and _ESCAPED_BYTE.search(c)), None)
        if bad is not None:
            byte = ord(_ESCAPED_BYTE.search(bad).group()) - 0xDC00
            excerpt = bad.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            yield line, None, f"{INVALID_UTF8}: byte 0x{byte:02x} is not UTF-8", excerpt[:_EXCERPT]
            continue
        if None in rec:
            n = len(reader.fieldnames) + len(rec[None])
            error = f"{MALFORMED}: {n} fields, header has {len(reader.fieldnames)}"
            yield line, None, error, str(rec[None])[:_EXCERPT]
            continue
        missing = [k for k, v in rec.items() if v is None]
        if missing:
            yield line, None, f"{MALFORMED}: missing fields {missing}", ""
            continue
        yield line, rec, None, ""
    text.detach()  # the caller owns (and closes) the binary file


def _parquet_records(f: BinaryIO) -> Iterator[Record]:
    number = 0
    for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
        try:
            records = batch.to_pylist()
        except UnicodeDecodeError:
            records = None  # a string column holds bytes that are not UTF-8: row by row
        for j in range(batch.num_rows):
            number += 1
            if records is not None:
                yield number, records[j], None, ""
                continue
            try:
                yield number, batch.slice(j, 1).to_pylist()[0], None, ""
            except UnicodeDecodeError as e:
                yield number, None, _utf8_error(e), ""


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
                fields.update(response=resp, teacher=src.teacher_name)
            if src.vote_fields:
                fields["votes"] = dumps(_recorded_votes(rec, src))
    if src.gold_field is not None and rec.get(src.gold_field) not in (None, ""):
        gold = rec[src.gold_field]
        # A generative task's gold is a reference answer, kept as written.
        label = None if task.generative else normalize_label(gold, task.labels, task.label_aliases)
        fields["gold"] = label or str(gold)
    if src.label_from == "gold":
        if "gold" not in fields:
            raise ValueError(f"no gold label in field {src.gold_field!r} (label_from: gold)")
        # An unknown gold label stays as written, for curation to filter with its reason.
        answer = fields["gold"] if task.generative else answer_json(task.label_key, fields["gold"])
        fields.update(response=answer, teacher=src.teacher_name)
    user = rec.get(src.user_field) if src.user_field is not None else None
    if user is None and _is_openai_record(rec):
        user = rec["request"].get("user")
    if user not in (None, ""):
        fields["user"] = str(user)
    for name, value in fields.items():
        # JSON may escape a lone surrogate ("\ud800"): no UTF-8 text can hold it.
        if isinstance(value, str) and _SURROGATE.search(value):
            raise ValueError(f"{INVALID_UTF8}: field {name!r} holds a lone surrogate")
    return fields


def _recorded_votes(rec: dict[str, Any], src: LogSource) -> list[dict[str, Any]]:
    """The recorded answers of one record as votes (labels are added when parsing)."""
    votes = []
    for name, field in [(src.teacher_name, src.response_field), *src.vote_fields.items()]:
        text = rec.get(field)
        if isinstance(text, str) and text.strip():
            votes.append({"teacher": name, "sample": 0, "response": text})
        else:
            votes.append(
                {
                    "teacher": name,
                    "sample": None,
                    "response": None,
                    "error": f"no answer in {field!r}",
                }
            )
    return votes


def log_rows(
    f: BinaryIO, path: str, src: LogSource, prompt: Prompt, task: TaskSection
) -> Iterator[dict[str, Any]]:
    """The rows of one log file, streamed: one per record (records ``src.skip`` to
    ``src.skip + src.limit``), the ones that could not be read as failed rows with their
    reason."""
    fmt = detect_format(path, src.format)
    for n, (line, rec, error, raw) in enumerate(iter_records(f, fmt)):
        if not src.reads(n):
            if n < src.skip:
                continue
            return
        if error is None:
            try:
                fields = _record_fields(rec, src, prompt, task)
            except ValueError as e:
                error = str(e)
                if not error.startswith(UNREADABLE):
                    error = f"{MALFORMED}: {error}"
        if error is not None:
            yield new_row(
                id=row_id(path, f"line:{line}"),
                source=path,
                source_line=line,
                input=raw or None,
                status=FAILED,
                reason=error,
            )
            continue
        yield new_row(id=row_id(path, fields["input"]), source=path, source_line=line, **fields)


def log_blocks(
    src: LogSource, task: TaskSection, block_rows: int, path: str | Path | None = None
) -> Iterator[pa.Table]:
    """One log file as a stream of row tables of at most `block_rows` rows: what a read task
    holds in memory is one block, whatever the size of the file. `path`: where to open it
    (default ``src.path``; rows name their source as configured)."""
    prompt = Prompt.from_task(task)
    block: list[dict[str, Any]] = []
    with open_input(path or src.path) as f:
        for row in log_rows(f, str(src.path), src, prompt, task):
            block.append(row)
            if len(block) >= block_rows:
                yield to_table(block)
                block = []
    if block:
        yield to_table(block)


def read_records(path: str | Path, fmt: str = "auto") -> list[dict[str, Any]]:
    """All records of a small file (seeds, test sets, replay tables); raises on one that
    cannot be read, naming the file and line."""
    records = []
    with open(path, "rb") as f:
        for line, rec, error, _ in iter_records(f, detect_format(path, fmt)):
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
