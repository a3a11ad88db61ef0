"""Durable, content-addressed cache of teacher responses.

The key is a hash of everything that determines an answer: the endpoint, the model, the
messages, the sampling parameters, the response format and whether (and with how many
alternatives) token logprobs were asked for: an answer cached without logprobs is never served
to a request that wants them. An entry is the whole ``TeacherReply``, its logprobs included.

Each entry is one small JSON file (``<dir>/ab/<key>.json``: 256 folders, made once, not one new
folder per answer) written to a temporary name and renamed into place, so:
re-running a job makes no teacher call for what it already asked; a run killed mid-way loses
only the requests that were in flight; several processes, and several nodes sharing the
directory (NFS, a mounted bucket), can read and write it at once without locks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_key(
    endpoint: str, model: str, messages: list[dict[str, Any]], params: dict[str, Any]
) -> str:
    blob = json.dumps(
        {"endpoint": endpoint.rstrip("/"), "model": model, "messages": messages, "params": params},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._made: set[Path] = set()  # subdirectories known to exist: no mkdir per answer

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return json.loads(data)

    def put(self, key: str, value: dict[str, Any]) -> None:
        path = self._path(key)
        if path.parent not in self._made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(json.dumps(value, ensure_ascii=False).encode())
        os.replace(tmp, path)  # atomic: a reader sees the whole entry or none

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*/*.json"))
