from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JIGSAW = Path(os.environ.get("DISTILL_JIGSAW_DIR", ROOT.parent / "shared" / "data" / "jigsaw"))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def jigsaw_dir() -> Path:
    if not JIGSAW.is_dir():
        pytest.skip(f"Jigsaw data not found at {JIGSAW} (set DISTILL_JIGSAW_DIR)")
    return JIGSAW


@pytest.fixture()
def in_root(monkeypatch):
    """Run with the project root as working directory (config paths are relative to it)."""
    monkeypatch.chdir(ROOT)
    return ROOT


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 API on 127.0.0.1 (moto's server) with the bucket 'distill-test'; this
    process's environment points pyarrow (and Ray's storage) at it for the session."""
    from tests.s3 import environment, s3_server

    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with s3_server(log) as env, environment(env):
        yield env
