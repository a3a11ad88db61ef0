"""Run folders and checkpoints on a cloud URI (``s3://``, ``gs://`` or ``file://``), through
pyarrow's filesystems: the same ones Ray Data, Ray Train and Ray Tune use, so credentials and endpoints come from the usual places (``AWS_*`` / ``AWS_ENDPOINT_URL``,
``GOOGLE_APPLICATION_CREDENTIALS``, instance roles).

A run whose ``run.output_dir`` is a URI keeps a **mirror** of its folder on the driver's disk:
the stages read and write it with local file APIs as usual, and ``Mirror.push`` uploads what
changed when a stage ends (the run's report section is written). Ray Train and Ray Tune write
their checkpoints straight to the URI. ``Mirror.pull`` brings a run's own files back (a later
stage or a resume on another machine), never Ray's checkpoints: those are copied on demand by
``local_copy`` on the node that loads them (evaluation, serving replicas, training workers).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger("distill.storage")

# Schemes of pyarrow's filesystems whose paths are <bucket>/<key> (so a path Ray reports
# inside one is a URI again with the scheme in front): S3 (and S3-compatible stores), GCS,
# and file:// for a local or mounted folder.
SCHEMES = ("s3", "gs", "gcs", "file")
MANIFEST = ".mirror.json"  # in the mirror and at the URI: the files the mirror pushed
# Where copies of URIs are kept on each node (checkpoints, a mirrored run folder).
CACHE_ENV = "DISTILL_CACHE_DIR"


def is_uri(path: str | os.PathLike | None) -> bool:
    return path is not None and "://" in str(path)


def check_uri(uri: str) -> str:
    """`uri` when its scheme is one pyarrow reads; else a ValueError saying which are."""
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in SCHEMES or not uri.split("://", 1)[1].strip("/") or "?" in uri:
        raise ValueError(
            f"{uri!r}: not a storage URI this project reads; use s3://bucket/path, "
            f"gs://bucket/path or file:///absolute/path, without options after '?' (an S3 "
            f"endpoint goes in AWS_ENDPOINT_URL)"
        )
    return uri.rstrip("/")


def join(base: str, *parts: str) -> str:
    """`base` (a URI or a path) with `parts` appended by '/'."""
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts if p)])


# What a bucket's filesystem is made from besides its URI: a change makes a new one.
_CREDENTIAL_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "GOOGLE_APPLICATION_CREDENTIALS",
)  # fmt: skip


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(bucket_uri: str, env: tuple[str | None, ...]) -> Any:
    # from_uri on s3:// asks the bucket's region on each call (one round trip): once per
    # bucket here, as the teacher cache keeps its own.
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(bucket_uri)[0]


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, the path in it) of a URI or a local path. For the schemes we
    read the path is what follows '<scheme>://' ('bucket/key'); one filesystem per bucket."""
    import pyarrow.fs

    if not is_uri(uri) or uri.startswith("file://"):
        return pyarrow.fs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).absolute())
    scheme, rest = uri.split("://", 1)
    bucket = rest.split("/", 1)[0]
    env = tuple(os.environ.get(k) for k in _CREDENTIAL_ENV)
    return _bucket_filesystem(f"{scheme}://{bucket}", env), rest.rstrip("/")


def list_files(uri: str) -> list[str]:
    """Every file under `uri` (recursive), as URIs, sorted."""
    import pyarrow.fs

    fs, root = filesystem(uri)
    if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
        return []
    found = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    out = []
    for info in found:
        if info.type == pyarrow.fs.FileType.File:
            out.append(join(uri, info.path[len(root) :].lstrip("/")))
    return sorted(out)


def list_dirs(uri: str) -> list[str]:
    """The names of the folders directly under `uri` (on a bucket: its common prefixes)."""
    import pyarrow.fs

    fs, root = filesystem(uri)
    if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
        return []
    found = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=False))
    return sorted(i.base_name for i in found if i.type == pyarrow.fs.FileType.Directory)


def exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


class _NativeRaw(io.RawIOBase):
    """A pyarrow random-access file as a Python raw file: buffered, it reads by lines and
    under io.TextIOWrapper as the readers of logs and seeds expect."""

    def __init__(self, native: Any):
        self._f = native

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()
        super().close()


def open_input(path: str | os.PathLike) -> BinaryIO:
    """A file (a path or a URI) open for binary reading, streamed: a log of any size."""
    if not is_uri(path):
        return open(path, "rb")  # noqa: SIM115 (the caller closes it: `with open_input(...)`)
    fs, where = filesystem(str(path))
    return io.BufferedReader(_NativeRaw(fs.open_input_file(where)), buffer_size=1 << 20)


def file_size(path: str | os.PathLike) -> int:
    """Bytes of a file (a path or a URI); FileNotFoundError naming it when there is none."""
    import pyarrow.fs

    fs, where = filesystem(str(path))
    info = fs.get_file_info(where)
    if info.type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(f"{path} is not a file")
    return info.size


def _copy_file(src: str, dst: str) -> None:
    """Stream one file from `src` to `dst` (paths or URIs), whatever its size."""
    sfs, spath = filesystem(src)
    dfs, dpath = filesystem(dst)
    if not is_uri(dst):
        Path(dpath).parent.mkdir(parents=True, exist_ok=True)
    with sfs.open_input_stream(spath) as fin, dfs.open_output_stream(dpath) as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object (objects appear whole when the upload ends; a local file is
    written aside and renamed)."""
    if not is_uri(uri) or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://")) if is_uri(uri) else Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:
        f.write(data)


def cache_dir() -> Path:
    """This node's folder for copies of URIs: DISTILL_CACHE_DIR, else ~/.cache/ray-distill."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ray-distill").absolute()


def as_uri_like(path: str | None, like: str) -> str | None:
    """A path inside the filesystem of `like` (what Ray reports for a checkpoint on cloud
    storage: 'bucket/key') as a URI of the same scheme; local paths unchanged."""
    if path is None or not is_uri(like) or is_uri(path):
        return path
    return f"{like.split('://', 1)[0]}://{path}"


def remove_dir(uri: str) -> None:
    """Delete the folder at `uri` with everything in it; nothing when there is none."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.Directory:
        fs.delete_dir(path)


def copy_dir(src: str, dst: str) -> None:
    """Copy the folder `src` into `dst` (each a path or a URI), replacing files of the same
    name."""
    import pyarrow.fs

    sfs, spath = filesystem(src)
    dfs, dpath = filesystem(dst)
    dfs.create_dir(dpath, recursive=True)
    pyarrow.fs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)


def local_copy(path: str) -> str:
    """A local directory holding `path`: itself when it is not a URI, else a copy of the
    folder at the URI in this node's cache (made once per version of it)."""
    if not is_uri(path):
        return path
    if path.startswith("file://"):
        return path.removeprefix("file://")
    import pyarrow.fs

    fs, root = filesystem(path)
    if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
        raise FileNotFoundError(f"{path}: no such folder")
    # Named by the URI and what is there now (names, sizes, times): a folder rewritten under
    # the same URI (a re-run's tokenizer) is copied again, an unchanged one never.
    listing = sorted(
        (i.path, i.size, i.mtime_ns)
        for i in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
        if i.type == pyarrow.fs.FileType.File
    )
    digest = hashlib.sha256(json.dumps([path, listing]).encode()).hexdigest()[:16]
    target = cache_dir() / "copies" / f"{Path(path.rstrip('/')).name}-{digest}"
    done = target / ".complete"
    if done.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes of one node (replicas, actors) ask at once: one copies, the others
    # wait for it; a finished copy is never removed (another process may be loading it).
    with open(target.with_name(f".{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)  # a copy killed half-way
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            copy_dir(path, str(tmp))
            (tmp / ".complete").write_text(path)
            tmp.rename(target)
    return str(target)


def mirror_dir(uri: str) -> Path:
    """The driver's local folder that mirrors the run folder at `uri`: the same on every
    machine with the same cache folder, so the report's paths hold after a pull."""
    scheme, rest = uri.split("://", 1)
    return cache_dir() / "runs" / scheme / rest.strip("/")


class Mirror:
    """A local folder kept in step with a URI: ``push`` uploads the files that changed since
    the last push (by size and modification time), ``pull`` downloads the files the URI's
    manifest lists that the folder lacks or holds in another version."""

    def __init__(self, local: Path, uri: str):
        self.local = Path(local)
        self.uri = uri.rstrip("/")

    def _state(self) -> dict[str, list[int]]:
        path = self.local / MANIFEST
        return json.loads(path.read_text()) if path.exists() else {}

    def _files(self) -> dict[str, list[int]]:
        out = {}
        for p in sorted(self.local.rglob("*")):
            if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"):
                st = p.stat()
                out[p.relative_to(self.local).as_posix()] = [st.st_size, st.st_mtime_ns]
        return out

    def push(self) -> list[str]:
        """Upload the changed files, delete at the URI the files pushed before and gone here
        (a stage's re-run replaces its outputs: readers of the URI must not see both), then
        the manifest; the files uploaded (relative)."""
        before, now = self._state(), self._files()
        changed = [rel for rel, sig in now.items() if before.get(rel) != sig]
        gone = [rel for rel in before if rel not in now]
        for rel in changed:
            _copy_file(str(self.local / rel), join(self.uri, rel))
        if gone:
            fs, root = filesystem(self.uri)
            for rel in gone:
                try:
                    fs.delete_file(f"{root}/{rel}")
                except FileNotFoundError:
                    log.info("%s/%s: already gone", self.uri, rel)
        if changed or gone or not before:
            manifest = json.dumps(now, sort_keys=True)
            # the URI's first: a failed upload leaves this folder's state as it was, so the
            # next push sends the same files again
            write_bytes(join(self.uri, MANIFEST), manifest.encode())
            (self.local / MANIFEST).write_text(manifest)
        return changed

    def pull(self) -> list[str]:
        """Download what the URI's manifest lists and this folder lacks or holds in another
        version; the files downloaded (relative). Nothing when the URI holds no run."""
        try:
            remote = json.loads(read_bytes(join(self.uri, MANIFEST)))
        except FileNotFoundError:
            return []
        here = self._files()
        for rel in self._state():
            if rel not in remote and rel in here:  # pushed once, since replaced at the URI
                (self.local / rel).unlink()
                del here[rel]
        fetched, missing = [], []
        for rel, sig in remote.items():
            if here.get(rel) == sig:
                continue
            target = self.local / rel
            try:
                _copy_file(join(self.uri, rel), str(target))
            except FileNotFoundError:
                missing.append(rel)  # removed by a later writer there (a re-run's train)
                continue
            os.utime(target, ns=(sig[1], sig[1]))  # as pushed: the next push skips it
            fetched.append(rel)
        if missing:
            log.warning(
                "%s: %d files its manifest lists are gone: %s", self.uri, len(missing), missing[:5]
            )
        self.local.mkdir(parents=True, exist_ok=True)
        state = {rel: sig for rel, sig in remote.items() if rel not in missing}
        (self.local / MANIFEST).write_text(json.dumps(state, sort_keys=True))
        return fetched
