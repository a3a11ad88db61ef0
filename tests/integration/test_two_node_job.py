"""A real 2-node Ray cluster on 127.0.0.1, with token authentication: a head and a second
`ray start --address` node, each with its own custom resource and one `train_slot`. The
whole loop of a small quickstart goes through `distill submit` (the Ray Jobs SDK) as a user
sends it; the train stage's two workers each need a train_slot, so they run one per node.
Checked: the job succeeded, its log has progress lines and no per-request lines, the report
is under the storage root the runtime_env gave, the train workers ran on both nodes; a job
without a storage root is refused with what to set. Both nodes are stopped by their own
process groups (never `ray stop`, which would stop every Ray on the machine)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Every port a node opens, free ones: other Ray clusters may run on this machine."""
    names = [
        "node-manager-port", "object-manager-port", "metrics-export-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
    ]  # fmt: skip
    return [f"--{name}={free_port()}" for name in names]


def stop_node(proc: subprocess.Popen) -> None:
    """SIGTERM to the node's process group (`ray start --block` then stops its raylet, GCS,
    dashboard and their workers), then SIGKILL to whatever of the group is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):  # then SIGKILL below
        proc.wait(timeout=30)
    time.sleep(1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@contextlib.contextmanager
def ray_node(make_args, env: dict[str, str], log: Path, attempts: int = 3):
    """`ray start --block ARGS` in its own process group, stopped on exit (also when the test
    fails). On a busy machine a node's dashboard agent can start later than its raylet waits
    for it (the raylet then exits): such a start is tried again, on fresh ports."""
    for attempt in range(1, attempts + 1):
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *make_args()],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        else:
            break
        stop_node(proc)
        if attempt == attempts:
            raise RuntimeError(f"ray start failed {attempts} times:\n{log.read_text()[-3000:]}")
    try:
        yield proc
    finally:
        stop_node(proc)


@pytest.fixture(scope="module")
def cluster():
    """(dashboard URL, environment with the cluster's token, temp folder) of a 2-node cluster."""
    # A short path: Ray's unix sockets live under the temp dir (107-character limit).
    tmp = Path(tempfile.mkdtemp(prefix="rd2n-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
    )
    gcs, dashboard = free_port(), free_port()

    def head() -> list[str]:
        nonlocal gcs, dashboard
        gcs, dashboard = free_port(), free_port()
        return [
            "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port()}", f"--temp-dir={tmp / 'ray'}",
            "--num-cpus=2", "--num-gpus=0", "--object-store-memory=200000000",
            '--resources={"head_node": 1, "train_slot": 1}', *node_ports(),
        ]  # fmt: skip

    def worker() -> list[str]:
        return [
            f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
            # its own temp dir as on a second machine: the two nodes' runtime_env agents
            # would otherwise unpack the job's working_dir into one folder at once
            f"--temp-dir={tmp / 'ray-worker'}",
            "--num-cpus=2", "--num-gpus=0", "--object-store-memory=200000000",
            '--resources={"worker_node": 1, "train_slot": 1}', *node_ports(),
        ]  # fmt: skip

    with (
        ray_node(head, env, tmp / "head.log"),
        ray_node(worker, env, tmp / "worker.log"),
    ):
        yield f"http://127.0.0.1:{dashboard}", env, tmp


def distill_submit(address: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ray_pipeline.cli", "submit", "configs/quickstart.yaml"]
    cmd += ["--address", address, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1000)


def test_token_is_required(cluster):
    address, env, _ = cluster
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["RAY_AUTH_TOKEN"] = "not-the-token"
    proc = distill_submit(address, no_token, "--no-wait")
    assert proc.returncode != 0
    assert "auth" in (proc.stdout + proc.stderr).lower()


def test_relative_output_dir_under_a_job_is_refused(cluster):
    address, env, _ = cluster
    proc = distill_submit(address, env)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "run.output_dir: 'runs' is a relative path, and this is a Ray job" in proc.stdout
    assert "DISTILL_STORAGE_ROOT" in proc.stdout and "working_dir_files" in proc.stdout
    assert "report: " not in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_whole_loop_on_two_nodes(cluster):
    address, env, tmp = cluster
    storage = tmp / "shared"
    runtime_env = tmp / "runtime_env.yaml"
    runtime_env.write_text(yaml.safe_dump({"env_vars": {"DISTILL_STORAGE_ROOT": str(storage)}}))
    proc = distill_submit(
        address, env, "--runtime-env", str(runtime_env),
        "--set", "run.run_id=two-node", "--set", "sweep=null",
        "--set", "data.seeds.n_new=40", "--set", "train.epochs=2",
        "--set", "train.num_workers=2", "--set", "train.cpus_per_worker=0.5",
        "--set", "train.resources_per_worker={train_slot: 1}",
        "--set", "teacher.actors=1", "--set", "serve.port=0", "--set", "serve.smoke_requests=12",
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:] + proc.stderr[-3000:]
    report = storage / "runs" / "two-node" / "report.md"
    lines = out.strip().splitlines()
    assert "SUCCEEDED" in lines[-2] and lines[-1] == f"report: {report}"
    assert report.exists()
    sections = json.loads(report.with_name("report.json").read_text())
    assert {"generate", "curate", "train", "evaluate", "serve"} <= set(sections)
    assert (storage / "runs" / "cache" / "teacher").is_dir()  # the cache beside the runs
    # the job's log: progress lines, not one line per HTTP request (12 smoke requests, ~280
    # teacher calls)
    assert "teacher: " in out and " rows (" in out
    assert "HTTP Request" not in out and "POST /v1/chat/completions" not in out
    # the train workers: one on each node (asked of the cluster's state API with the token)
    query = (
        "import json; from ray.util.state import list_actors, list_nodes\n"
        f"a = list_actors(address={address!r}, filters=[('class_name', '=', 'RayTrainWorker')],"
        " limit=1000, detail=True, raise_on_missing_output=False)\n"
        f"n = list_nodes(address={address!r}, detail=True)\n"
        "print(json.dumps({'workers': [x.node_id for x in a],"
        " 'nodes': {x.node_id: sorted(x.resources_total) for x in n}}))"
    )
    state = subprocess.run(
        [sys.executable, "-c", query], env=env, capture_output=True, text=True, timeout=120
    )
    assert state.returncode == 0, state.stderr[-3000:]
    found = json.loads(state.stdout.strip().splitlines()[-1])
    kinds = {node: ("head_node" in res) * "head" + ("worker_node" in res) * "worker"
             for node, res in found["nodes"].items()}  # fmt: skip
    assert sorted(kinds[node] for node in found["workers"]) == ["head", "worker"]
