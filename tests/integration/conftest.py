from __future__ import annotations

import contextlib
import shutil
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


def pytest_collection_modifyitems(items):
    # The first test to ask for the 2-node job waits for the whole loop on a cluster it starts
    # (about 8 minutes on 2 cores): more than the default per-test timeout.
    for item in items:
        if "two_node_job" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(1800))


@pytest.fixture(scope="session")
def two_node_job():
    """The whole loop of the quickstart, a little smaller, submitted with `distill submit` to a
    real 2-node Ray cluster on 127.0.0.1 (its own processes, stopped before this returns):
    see tests/integration/two_node.py."""
    from tests.integration.two_node import two_node_job as run

    job = run()
    yield job
    # the run folder the session's tests read, and the nodes' logs; a leftover file (a Ray
    # process still exiting) must not fail the session, the folder is in /tmp
    shutil.rmtree(job.tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def e2e_run(two_node_job):
    """The whole loop's run folder (from the 2-node job: one run of the loop serves the
    end-to-end, serving and cluster tests); several tests read it."""
    return two_node_job.run_dir
