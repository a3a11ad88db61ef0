"""The request log: every request and its answer (and a shadow's answer beside it), written
off the request path, in the log format the generate stage reads.

A record is ``{"request": {"model", "messages", ...}, "response": <chat.completion>,
"served_by": target, ...}``: ``ray_pipeline.data.sources`` reads it as an OpenAI-style log
record, keeps a teacher's answer as a label and re-asks the teacher about a student's. Text
completions are logged as the equivalent chat (one user message) so that every record reads
the same way.

Files are partitioned by the UTC time of the request (a folder per minute, hour or day) and
named by the replica that wrote them, so replicas never share a file::

    <dir>/2025-06-01T13/requests-<replica>.jsonl             (appended at every flush)
    <dir>/2025-06-01T13/requests-<replica>-000001.parquet     (one file per flush)
    <dir>/2025-06-01T13/rejected-<replica>.jsonl             (requests refused as bad input)

Requests refused as bad input (a 4xx other than 429: malformed, unknown model, too long) go
to the ``rejected`` files: every request is logged, and the next round reads only inputs a
client could rightly send (answered ones, and those a target failed on).

On a cloud URI (``s3://``, ``gs://``: the run folder of a run whose ``run.output_dir`` is one)
objects cannot be appended to, so JSONL is written like Parquet, one file per flush
(``requests-<replica>-000001.jsonl``).

The router writes these files from a background thread (``serve_apps.request_log``); the
serve stage lists and reads them (``log_files``, ``served_inputs``).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ray_pipeline import storage

_PARTITIONS = {"minute": "%Y-%m-%dT%H-%M", "hour": "%Y-%m-%dT%H", "day": "%Y-%m-%d"}

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
_USAGE = pa.struct(
    [("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("total_tokens", pa.int64())]
)
# Parquet needs one schema for every file: the record's fields, typed.
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("ts", pa.float64()),
        ("endpoint", pa.string()),
        ("mode", pa.string()),
        (
            "request",
            pa.struct(
                [
                    ("model", pa.string()),
                    ("messages", pa.list_(_MESSAGE)),
                    ("max_tokens", pa.int64()),
                    ("stop", pa.list_(pa.string())),
                    ("stream", pa.bool_()),
                    ("seed", pa.int64()),
                    ("top_p", pa.float64()),
                    ("user", pa.string()),
                ]
            ),
        ),
        (
            "response",
            pa.struct(
                [
                    ("id", pa.string()),
                    ("object", pa.string()),
                    ("created", pa.int64()),
                    ("model", pa.string()),
                    (
                        "choices",
                        pa.list_(
                            pa.struct(
                                [
                                    ("index", pa.int64()),
                                    ("message", _MESSAGE),
                                    ("finish_reason", pa.string()),
                                ]
                            )
                        ),
                    ),
                    ("usage", _USAGE),
                ]
            ),
        ),
        ("served_by", pa.string()),
        ("status", pa.int64()),
        ("error", pa.string()),
        ("latency_ms", pa.float64()),
        ("confidence", pa.float64()),
        ("valid", pa.bool_()),
        ("fallback", pa.string()),
        (
            "shadow",
            pa.struct(
                [
                    ("target", pa.string()),
                    ("status", pa.int64()),
                    ("answer", pa.string()),
                    ("error", pa.string()),
                    ("agree", pa.bool_()),
                    ("latency_ms", pa.float64()),
                ]
            ),
        ),
    ]
)


REQUESTS, REJECTED = "requests", "rejected"


def refused(record: dict[str, Any]) -> bool:
    """A request refused as bad input (a 4xx other than 429): kept in the ``rejected`` files,
    out of the next round's log (its input may be a 1 MB prompt or no input at all)."""
    return 400 <= record["status"] < 500 and record["status"] != 429


def partition_of(ts: float, granularity: str) -> str:
    return time.strftime(_PARTITIONS[granularity], time.gmtime(ts))


class RequestLogFiles:
    """Writes batches of records into time-partitioned JSONL or Parquet files."""

    def __init__(self, directory: str | os.PathLike, fmt: str, partition: str, writer: str):
        if fmt not in ("jsonl", "parquet"):
            raise ValueError(f"request log format must be jsonl or parquet, got {fmt!r}")
        if partition not in _PARTITIONS:
            raise ValueError(f"request log partition must be one of {list(_PARTITIONS)}")
        self.uri = str(directory) if storage.is_uri(directory) else None
        self.dir = Path(directory)
        self.fmt = fmt
        self.partition = partition
        self.writer = writer
        self._seq = 0

    def write(self, records: list[dict[str, Any]]) -> list[Path | str]:
        """Write `records` (each into its own time partition); the files written."""
        by_part: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            by_part[partition_of(r["ts"], self.partition)].append(r)
        written: list[Path | str] = []
        for part, recs in sorted(by_part.items()):
            kept = [r for r in recs if not refused(r)]
            rejected = [r for r in recs if refused(r)]
            for kind, batch in ((REQUESTS, kept), (REJECTED, rejected)):
                if batch:
                    written.append(self._write(part, kind, batch))
        return written

    def _write(self, part: str, kind: str, records: list[dict[str, Any]]) -> Path | str:
        if self.fmt == "jsonl" and self.uri is None:
            folder = self.dir / part
            folder.mkdir(parents=True, exist_ok=True)
            return self._append_jsonl(folder / f"{kind}-{self.writer}.jsonl", records)
        # One file per flush (Parquet; JSONL too on a URI: an object cannot be appended to),
        # written whole (a local one aside and renamed): a reader never sees half a file.
        self._seq += 1
        name = f"{kind}-{self.writer}-{self._seq:06d}.{self.fmt}"
        if self.fmt == "jsonl":
            data = _jsonl(records)
        else:
            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist(records, schema=SCHEMA), sink)
            data = sink.getvalue().to_pybytes()
        where = storage.join(self.uri, part, name) if self.uri else self.dir / part / name
        storage.write_bytes(str(where), data)
        return where

    @staticmethod
    def _append_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
        data = _jsonl(records)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            while written < len(data):
                written += os.write(fd, data[written:])
        finally:
            os.close(fd)
        return path


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    # ensure_ascii=False: text stays readable; U+2028/U+2029 stay raw, which the reader keeps
    # inside their record (it splits on \n only).
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def log_files(directory: str | os.PathLike, kind: str = REQUESTS) -> list[Path] | list[str]:
    """Every request log file under `directory` (``kind`` 'rejected': the refused requests'
    files), oldest partition first: what the next round's ``data.logs`` lists. URIs for a
    log on a cloud URI."""
    if storage.is_uri(directory):
        found = storage.list_files(str(directory))
        return [
            f
            for f in found
            if f.rsplit("/", 1)[-1].startswith(f"{kind}-") and f.endswith((".jsonl", ".parquet"))
        ]
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted([*root.glob(f"*/{kind}-*.jsonl"), *root.glob(f"*/{kind}-*.parquet")])
