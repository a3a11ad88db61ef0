"""Dataset manifests: what a dataset was made from, how, and what was dropped."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_entry(path: str | Path, **extra: Any) -> dict[str, Any]:
    p = Path(path)
    return {"path": str(path), "bytes": p.stat().st_size, "sha256": file_sha256(p), **extra}


def content_hash(ids_and_labels: list[tuple[str, str]]) -> str:
    """Order-independent hash of a dataset's content (row ids with their labels)."""
    h = hashlib.sha256()
    for rid, label in sorted(ids_and_labels):
        h.update(f"{rid}\x00{label}\n".encode())
    return h.hexdigest()


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> Path:
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest}
    Path(path).write_text(json.dumps(manifest, indent=2, default=str))
    return Path(path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
