"""The whole loop on a real 2-node Ray cluster with token authentication, through
`distill submit` (the `two_node_job` fixture: tests/integration/two_node.py). Checked: the job
succeeded, its log has progress lines and no per-request lines, the report is under the
storage root the runtime_env gave (a bucket: S3 on 127.0.0.1), the train workers ran on both
nodes, the run in the bucket is whole; a wrong token is refused; a job without a storage root
is refused with what to set. test_end_to_end.py checks the same run folder stage by stage."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_token_is_required(two_node_job):
    proc = two_node_job.wrong_token
    assert proc.returncode != 0
    assert "auth" in (proc.stdout + proc.stderr).lower()


def test_relative_output_dir_under_a_job_is_refused(two_node_job):
    proc = two_node_job.relative_output
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "run.output_dir: 'runs' is a relative path, and this is a Ray job" in proc.stdout
    assert "DISTILL_STORAGE_ROOT" in proc.stdout and "working_dir_files" in proc.stdout
    assert "report: " not in proc.stdout


def test_whole_loop_on_two_nodes(two_node_job):
    job = two_node_job
    out = job.loop.stdout
    lines = out.strip().splitlines()
    assert "SUCCEEDED" in lines[-2] and lines[-1] == f"report: {job.run_uri}/report.md"
    assert job.run_uri == "s3://distill-test/shared/runs/e2e"
    assert "runs/e2e/report.md" in job.bucket
    sections = json.loads((job.run_dir / "report.json").read_text())
    assert {"generate", "curate", "train", "sweep", "evaluate", "serve"} <= set(sections)
    # the cache beside the runs, in the bucket
    assert sum(f.startswith("runs/cache/teacher/") for f in job.bucket) > 100
    # the job's log: progress lines, not one line per HTTP request (12 smoke requests, ~400
    # teacher calls)
    assert "teacher: " in out and " rows (" in out
    assert "HTTP Request" not in out and "POST /v1/chat/completions" not in out
    # Ray Train workers ran on both nodes: the train stage's two (one train_slot each, one
    # slot per node) and the sweep's trials
    assert set(job.train_workers) == {"head", "worker"}, job.train_workers
    assert len(job.train_workers) >= 2


def test_the_run_in_the_bucket_is_whole(two_node_job):
    """A pull of the run from the bucket into an empty folder (what another machine does to
    continue it) holds every file of the driver's mirror, byte for byte; Ray Train and Tune
    wrote their checkpoints to the bucket; the serve replicas wrote the request log there."""
    job = two_node_job
    assert job.pulled_files == job.mirror_files and len(job.mirror_files) > 50
    mine = [f.removeprefix("runs/e2e/") for f in job.bucket if f.startswith("runs/e2e/")]
    assert any(f.startswith("train/checkpoint_") for f in mine)  # Ray Train's own checkpoints
    assert any(f.startswith("sweep/trials/") and "/checkpoint_" in f for f in mine)
    assert any(f.startswith("sweep/tune/") for f in mine)  # Tune's experiment state
    report = json.loads((job.run_dir / "report.json").read_text())
    # the best trial's checkpoint: in the bucket, and copied into the run folder
    best = report["sweep"]["best"]
    assert best["checkpoint_uri"].startswith(f"{job.run_uri}/sweep/trials/")
    assert best["checkpoint"] == str(job.run_dir / "sweep" / "best")
    assert report["serve"]["request_log"] == f"{job.run_uri}/serve/requests"
    assert sorted(job.request_log) == report["serve"]["request_log_files"]
    # the worker node copied what its train workers loaded (the tiny student's base) from
    # the bucket into its own cache: it shares no disk with the driver
    copies = job.tmp / "cache-worker" / "copies"
    assert copies.is_dir() and any(p.name.startswith("student_base-") for p in copies.iterdir())
