from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole test session (starting it costs seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def start_simulator(tmp: Path, *args: str) -> tuple[subprocess.Popen, str]:
    ready = tmp / f"sim-url-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray_pipeline.cli", "teacher-sim", "--host", "127.0.0.1", "--port", "0", "--ready-file", str(ready), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"simulator did not start: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.05)
    return proc, ready.read_text()


@pytest.fixture()
def simulator(tmp_path):
    """Start `distill teacher-sim` with the given arguments; stopped after the test."""
    procs = []

    def start(*args: str) -> str:
        proc, url = start_simulator(tmp_path, *args)
        procs.append(proc)
        return url

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=10)
