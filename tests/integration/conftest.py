from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ray_pipeline.data import synthetic
from ray_pipeline.teacher.sim_server import simulator_process


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole test session (starting it costs seconds)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def write_sim_config(path: Path, **settings) -> Path:
    """A run config for the quickstart task whose teacher.simulator section holds `settings`
    (what `distill teacher-sim CONFIG` serves)."""
    data = {
        "task": synthetic.TASK,
        "teacher": {"model": "sim-teacher", "simulator": {"enabled": True, **settings}},
        "data": {"logs": [{"path": "unused.jsonl"}]},
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture()
def simulator(tmp_path):
    """Start the simulator with teacher.simulator settings, e.g. simulator(rule="quickstart",
    rate_429=0.1) (any number of times); each is stopped after the test."""
    configs = iter(range(1000))
    with contextlib.ExitStack() as stack:

        def start(**settings) -> str:
            path = write_sim_config(tmp_path / f"simulator-{next(configs)}.yaml", **settings)
            return stack.enter_context(simulator_process(path))

        yield start


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
        "--set", "sweep.fractions=[1.0]",
        "--set", "serve.port=0", "--set", "serve.smoke_requests=12",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(
            f"distill run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return out / "e2e"
