"""A real S3 API on 127.0.0.1 for tests: moto's server (a separate process speaking the S3
HTTP protocol), reached through pyarrow's S3 filesystem exactly as a bucket would be, with the
endpoint and credentials from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ray_pipeline.teacher.sim_server import stop_process

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server(log: Path, buckets: tuple[str, ...] = ("distill-test",)) -> Iterator[dict[str, str]]:
    """Start moto's S3 server with `buckets`; yield the environment a process needs to reach
    it (to be added to os.environ or a node's environment); stop it on exit."""
    import pyarrow.fs

    port = _free_port()
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [server, "-H", HOST, "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    endpoint = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/", timeout=1).close()
                break
            except OSError as e:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto's S3 server did not start: {log.read_text()[-2000:]}"
                    ) from e
                time.sleep(0.2)
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        fs = pyarrow.fs.S3FileSystem(
            endpoint_override=endpoint,
            access_key="test",
            secret_key="test",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        for bucket in buckets:
            fs.create_dir(bucket)
        yield env
    finally:
        stop_process(proc)


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """`env` set in this process's environment for the block."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
