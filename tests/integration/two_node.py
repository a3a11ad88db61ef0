"""A real 2-node Ray cluster on 127.0.0.1, with token authentication, and the whole loop
submitted to it as a user sends it (`distill submit`, the Ray Jobs SDK).

The head and a second `ray start --address` node each get their own custom resource
(`head_node`, `worker_node`) and one `train_slot`; the job's train workers each ask for a
train_slot, so two of them run one per node. The cluster lives only as long as
`two_node_job()` runs: everything the tests check is gathered while it is up (the whole
loop's output and log, where its train workers ran, the answers to a wrong token and to a
relative output path), then both nodes are stopped by their own process groups (never
`ray stop`, which would stop every Ray on the machine), so no idle cluster burdens the tests
that come after.

The job's storage root is a bucket, ``s3://distill-test/shared``, on a real S3 API on
127.0.0.1 (moto's server, tests/s3.py), as on a cloud cluster whose nodes share no disk: each
node has its own cache folder (DISTILL_CACHE_DIR) and the bucket's endpoint and credentials
in its environment (as an instance role gives them). The run folder is written there through
the driver's mirror, Ray Train and Tune checkpoint there, workers and replicas copy what they
load from it. The driver's mirror of the run folder is the one the end-to-end tests read
(`e2e_run`); a pull of the run from the bucket into an empty folder is compared with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ray_pipeline import storage
from ray_pipeline.serving.stage import free_port
from tests.integration.conftest import ROOT
from tests.s3 import environment, s3_server

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
RUN_ID = "e2e"
BUCKET = "distill-test"
STORAGE = f"s3://{BUCKET}/shared"  # the job's storage root


def node_ports() -> list[str]:
    """Every port a node opens, free ones: other Ray clusters may run on this machine."""
    names = [
        "node-manager-port", "object-manager-port", "metrics-export-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
    ]  # fmt: skip
    return [f"--{name}={free_port(HOST)}" for name in names]


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


@contextlib.contextmanager
def two_node_cluster(tmp: Path, node_env: dict[str, str]):
    """(dashboard URL, environment with the cluster's token) of a 2-node cluster; `node_env`
    is added to both nodes' environment, and each node gets a cache folder of its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
    )
    gcs, dashboard = free_port(HOST), free_port(HOST)

    def head() -> list[str]:
        nonlocal gcs, dashboard
        gcs, dashboard = free_port(HOST), free_port(HOST)
        return [
            "--head", f"--port={gcs}", f"--node-ip-address={HOST}",
            f"--dashboard-host={HOST}", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port(HOST)}", f"--temp-dir={tmp / 'ray'}",
            "--num-cpus=2", "--num-gpus=0", "--object-store-memory=200000000",
            '--resources={"head_node": 1, "train_slot": 1}', *node_ports(),
        ]  # fmt: skip

    def worker() -> list[str]:
        return [
            f"--address={HOST}:{gcs}", f"--node-ip-address={HOST}",
            # its own temp dir as on a second machine: the two nodes' runtime_env agents
            # would otherwise unpack the job's working_dir into one folder at once
            f"--temp-dir={tmp / 'ray-worker'}",
            "--num-cpus=2", "--num-gpus=0", "--object-store-memory=200000000",
            '--resources={"worker_node": 1, "train_slot": 1}', *node_ports(),
        ]  # fmt: skip

    def own(name: str) -> dict[str, str]:
        return {**env, **node_env, storage.CACHE_ENV: str(tmp / f"cache-{name}")}

    with (
        ray_node(head, own("head"), tmp / "head.log"),
        ray_node(worker, own("worker"), tmp / "worker.log"),
    ):
        yield f"http://{HOST}:{dashboard}", env


def distill_submit(address: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ray_pipeline.cli", "submit", "configs/quickstart.yaml"]
    cmd += ["--address", address, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1000)


def train_worker_nodes(address: str, env: dict) -> list[str]:
    """'head' or 'worker' for every Ray Train worker the cluster ran (the train stage's and
    the sweep's), asked of the cluster's state API with the token."""
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
    if state.returncode != 0:
        raise RuntimeError(f"the state API query failed:\n{state.stderr[-3000:]}")
    found = json.loads(state.stdout.strip().splitlines()[-1])
    kinds = {node: ("head_node" in res) * "head" + ("worker_node" in res) * "worker"
             for node, res in found["nodes"].items()}  # fmt: skip
    return sorted(kinds[node] for node in found["workers"])


@dataclass
class TwoNodeJob:
    tmp: Path  # the cluster's temp dirs, caches and logs: removed after the session
    loop: subprocess.CompletedProcess  # `distill submit` of the whole loop
    train_workers: list[str]  # 'head' / 'worker' per Ray Train worker the cluster ran
    wrong_token: subprocess.CompletedProcess  # `distill submit` with a wrong token
    relative_output: subprocess.CompletedProcess  # a job with no storage root
    bucket: list[str]  # every object under the storage root (names relative to it)
    request_log: dict[str, bytes]  # the serve stage's request log objects (URI -> content)
    # sha256 per file of the driver's mirror of the run and of a pull of the run from the
    # bucket into an empty folder, taken as the job ended (later tests write in the mirror)
    mirror_files: dict[str, str]
    pulled_files: dict[str, str]

    storage_root = STORAGE  # DISTILL_STORAGE_ROOT given to the job by its runtime_env
    run_uri = f"{STORAGE}/runs/{RUN_ID}"  # the whole loop's run folder

    @property
    def run_dir(self) -> Path:
        return mirror_of(self.tmp)


def mirror_of(tmp: Path) -> Path:
    """The driver's mirror of the run folder (the job's driver runs on the head node)."""
    return tmp / "cache-head" / "runs" / "s3" / TwoNodeJob.run_uri.removeprefix("s3://")


def two_node_job() -> TwoNodeJob:
    """Start the cluster, submit the whole loop (the quickstart, a little smaller: one sweep
    trial per dataset size), gather what the tests check, stop the cluster. Raises with the
    job's log when the loop fails, so every test that needs its run folder says why (the
    nodes' logs stay in the temp folder then)."""
    # A short path: Ray's unix sockets live under the temp dir (107-character limit).
    tmp = Path(tempfile.mkdtemp(prefix="rd2n-", dir="/tmp"))
    runtime_env = tmp / "runtime_env.yaml"
    runtime_env.write_text(yaml.safe_dump({"env_vars": {"DISTILL_STORAGE_ROOT": STORAGE}}))
    with (
        s3_server(tmp / "s3.log", buckets=(BUCKET,)) as s3_env,
        two_node_cluster(tmp, s3_env) as (address, env),
    ):
        wrong = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
        wrong_token = distill_submit(address, wrong, "--no-wait")
        relative_output = distill_submit(address, env)
        loop = distill_submit(
            address, env, "--runtime-env", str(runtime_env),
            "--set", f"run.run_id={RUN_ID}", "--set", "data.seeds.n_new=80",
            "--set", "sweep.learning_rate=[0.003]", "--set", "sweep.fractions=[1.0]",
            "--set", "train.num_workers=2", "--set", "train.cpus_per_worker=0.5",
            "--set", "train.resources_per_worker={train_slot: 1}",
            "--set", "teacher.actors=1", "--set", "serve.port=0",
            "--set", "serve.smoke_requests=12",
        )  # fmt: skip
        if loop.returncode != 0:
            raise RuntimeError(
                f"the whole loop's job failed ({loop.returncode}):\n{loop.stdout[-6000:]}\n"
                f"{loop.stderr[-3000:]}"
            )
        workers = train_worker_nodes(address, env)
        with environment(s3_env):  # what is in the bucket, read before the server stops
            bucket = [f[len(STORAGE) + 1 :] for f in storage.list_files(STORAGE)]
            requests = storage.list_files(f"{TwoNodeJob.run_uri}/serve/requests")
            request_log = {f: storage.read_bytes(f) for f in requests}
            pulled = tmp / "pulled"
            storage.Mirror(pulled, TwoNodeJob.run_uri).pull()
    return TwoNodeJob(
        tmp=tmp,
        loop=loop,
        train_workers=workers,
        wrong_token=wrong_token,
        relative_output=relative_output,
        bucket=bucket,
        request_log=request_log,
        mirror_files=digests(mirror_of(tmp)),
        pulled_files=digests(pulled),
    )


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by its path relative to it."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }
