"""The whole loop with its run folder on a bucket beside the same loop on a local folder.

Runs ``distill run configs/quickstart.yaml`` (a little smaller: 80 synthetic inputs, one sweep
trial, 12 smoke requests) twice in one go, each a fresh process on an embedded Ray: once with
``run.output_dir`` a local folder, once ``s3://distill-bench/runs`` on moto's S3 server on
127.0.0.1 (a real S3 API over HTTP, as tests/s3.py starts it). What a user waits for is the
command's wall time; each stage's own seconds come from the run's report. Also counted: the
objects and bytes the bucket holds after the run (the teacher cache, the mirrored run folder,
Ray Train's and Tune's checkpoints, the request log).

Prints one JSON object: per target ``wall_s``, ``stages_s`` and, for the bucket,
``objects`` / ``mbytes``; ``ratio`` = bucket wall / local wall. A local S3 server has no
network latency: on a real bucket each upload and listing costs a round trip more.

    python benchmarks/uri_run_folder.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray_pipeline import storage  # noqa: E402
from tests.s3 import environment, s3_server  # noqa: E402

SMALL = [
    "--set", "data.seeds.n_new=80", "--set", "sweep.learning_rate=[0.003]",
    "--set", "sweep.fractions=[1.0]", "--set", "serve.port=0", "--set", "serve.smoke_requests=12",
]  # fmt: skip


def loop(output_dir: str, env: dict[str, str], run_id: str) -> tuple[float, dict[str, float]]:
    cmd = [sys.executable, "-m", "ray_pipeline.cli", "run", "configs/quickstart.yaml"]
    cmd += ["--set", f"run.output_dir={output_dir}", "--set", f"run.run_id={run_id}", *SMALL]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{output_dir}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    report_line = proc.stdout.strip().splitlines()[-1].removeprefix("report: ")
    with environment(env):
        report = json.loads(storage.read_bytes(report_line.replace("report.md", "report.json")))
    stages = {s: report[s]["seconds"] for s in stages_of(report)}
    return round(wall, 1), stages


def stages_of(report: dict) -> list[str]:
    return [s for s in ("generate", "curate", "train", "sweep", "evaluate", "serve") if s in report]


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="uri-bench-"))
    out: dict[str, object] = {}
    with s3_server(tmp / "s3.log", buckets=("distill-bench",)) as s3_env:
        env = {**os.environ, **s3_env, storage.CACHE_ENV: str(tmp / "cache")}
        wall, stages = loop(str(tmp / "runs"), env, "bench-local")
        out["local"] = {"wall_s": wall, "stages_s": stages}
        wall, stages = loop("s3://distill-bench/runs", env, "bench-s3")
        with environment(s3_env):
            sizes = [storage.file_size(f) for f in storage.list_files("s3://distill-bench")]
        out["bucket"] = {
            "wall_s": wall,
            "stages_s": stages,
            "objects": len(sizes),
            "mbytes": round(sum(sizes) / 2**20, 2),
        }
    out["ratio"] = round(out["bucket"]["wall_s"] / out["local"]["wall_s"], 3)  # type: ignore[index]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
