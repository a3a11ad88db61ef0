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
    """A folder, or a cloud URI (``s3://bucket/cache``, ``gs://...``) through pyarrow's
    filesystems: there an object appears whole when its upload ends, so no rename is needed."""

    def __init__(self, directory: str | os.PathLike):
        directory = str(directory)
        self.uri = directory if "://" in directory else None
        if self.uri is not None:
            import pyarrow.fs

            self.fs, self.root = pyarrow.fs.FileSystem.from_uri(self.uri)
            self.root = self.root.rstrip("/")
            self.fs.create_dir(self.root, recursive=True)
            self._made_objects: set[str] = set()
            return
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._made: set[Path] = set()  # subdirectories known to exist: no mkdir per answer

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def _object(self, key: str) -> str:
        return f"{self.root}/{key[:2]}/{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        if self.uri is not None:
            try:
                with self.fs.open_input_stream(self._object(key)) as f:
                    return json.loads(f.read())
            except FileNotFoundError:
                return None
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return json.loads(data)

    def put(self, key: str, value: dict[str, Any]) -> None:
        if self.uri is not None:
            if key[:2] not in self._made_objects:  # a no-op on buckets, needed on file://
                self.fs.create_dir(f"{self.root}/{key[:2]}", recursive=True)
                self._made_objects.add(key[:2])
            with self.fs.open_output_stream(self._object(key)) as f:
                f.write(json.dumps(value, ensure_ascii=False).encode())
            return
        path = self._path(key)
        if path.parent not in self._made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(json.dumps(value, ensure_ascii=False).encode())
        os.replace(tmp, path)  # atomic: a reader sees the whole entry or none

    def __len__(self) -> int:
        if self.uri is not None:
            import pyarrow.fs

            found = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, recursive=True))
            return sum(1 for i in found if i.path.endswith(".json"))
        return sum(1 for _ in self.dir.glob("*/*.json"))
