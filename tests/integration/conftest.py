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

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def start_simulator(tmp: Path, *args: str) -> tuple[subprocess.Popen, str]:
    ready = tmp / f"sim-url-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray_pipeline.cli",
            "teacher-sim",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--ready-file",
            str(ready),
            *args,
        ],
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


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory):
    """`distill run` of the quickstart config, a little smaller, in a subprocess as a user runs
    it (its own embedded Ray, the simulator started and stopped by the run). Returns the run
    folder; several tests read it."""
    out = tmp_path_factory.mktemp("e2e")
    cmd = [
        sys.executable, "-m", "ray_pipeline.cli", "run", "configs/quickstart.yaml",
        "--set", f"run.output_dir={out}", "--set", "run.run_id=e2e",
        "--set", "data.seeds.n_new=80", "--set", "sweep.learning_rate=[0.003]",
        "--set", "serve.port=0", "--set", "serve.smoke_requests=12",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(
            f"distill run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return out / "e2e"
