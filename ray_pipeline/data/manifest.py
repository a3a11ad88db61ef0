"""Dataset manifests: what a dataset was made from, how, and what was dropped."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ray_pipeline.storage import file_size, open_input


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open_input(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_entry(path: str | Path, **extra: Any) -> dict[str, Any]:
    return {"path": str(path), "bytes": file_size(path), "sha256": file_sha256(path), **extra}


_DIGEST_MOD = 1 << 256


def digest_part(*fields: object) -> int:
    """One row's share of a content hash (``row_digest``): sha256 of its fields, as a number."""
    data = "\x00".join(str(f) for f in fields).encode() + b"\n"
    return int.from_bytes(hashlib.sha256(data).digest(), "big")


def digest_hex(total: int) -> str:
    """A sum of ``digest_part`` values as the content hash."""
    return f"{total % _DIGEST_MOD:064x}"


def row_digest(rows: Iterable[tuple[object, ...]]) -> str:
    """Order-independent hash of a dataset's content (e.g. row ids with their labels): the sum
    of the rows' sha256 values modulo 2^256, so parts of a dataset are hashed where they are
    (one sum per block) and added up, never sorted in one place; a repeated row counts twice."""
    return digest_hex(sum(digest_part(*r) for r in rows))


def content_hash(ids_and_labels: Iterable[tuple[str, str]]) -> str:
    """Order-independent hash of a dataset's content (row ids with their labels)."""
    return row_digest(ids_and_labels)


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> Path:
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest}
    Path(path).write_text(json.dumps(manifest, indent=2, default=str))
    return Path(path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
