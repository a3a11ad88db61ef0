"""The whole loop on a real 2-node Ray cluster with token authentication, through
`distill submit` (the `two_node_job` fixture: tests/integration/two_node.py). Checked: the job
succeeded, its log has progress lines and no per-request lines, the report is under the
storage root the runtime_env gave, the train workers ran on both nodes; a wrong token is
refused; a job without a storage root is refused with what to set. test_end_to_end.py checks
the same run folder stage by stage."""

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
    job, storage = two_node_job, two_node_job.storage
    out = job.loop.stdout
    report = job.run_dir / "report.md"
    lines = out.strip().splitlines()
    assert "SUCCEEDED" in lines[-2] and lines[-1] == f"report: {report}"
    assert report.exists()
    sections = json.loads(report.with_name("report.json").read_text())
    assert {"generate", "curate", "train", "sweep", "evaluate", "serve"} <= set(sections)
    assert (storage / "runs" / "cache" / "teacher").is_dir()  # the cache beside the runs
    # the job's log: progress lines, not one line per HTTP request (12 smoke requests, ~400
    # teacher calls)
    assert "teacher: " in out and " rows (" in out
    assert "HTTP Request" not in out and "POST /v1/chat/completions" not in out
    # Ray Train workers ran on both nodes: the train stage's two (one train_slot each, one
    # slot per node) and the sweep's trials
    assert set(job.train_workers) == {"head", "worker"}, job.train_workers
    assert len(job.train_workers) >= 2
