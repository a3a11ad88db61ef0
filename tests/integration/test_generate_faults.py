"""The generate stage on local Ray against a faulty simulator: every input accounted for,
retries bounded, 429 storms slow the pool, budget stops resume, a killed run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from ray_pipeline.config import load_config
from ray_pipeline.data import synthetic
from ray_pipeline.data.schema import FAILED, OK
from ray_pipeline.pipeline import RunStopped, run_stages
from ray_pipeline.run_state import load_report

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
KEY_ENV = "DISTILL_TEST_KEY"


def sim(url: str, path: str = "/metrics", method: str = "GET") -> dict:
    req = urllib.request.Request(url.removesuffix("/v1") + path, method=method)
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def write_logs(path: Path, n: int, seed: int = 5, broken: int = 0) -> list[str]:
    texts = synthetic.generate_comments(n, seed)
    lines = [json.dumps({"input": t}) for t in texts]
    for i in range(broken):
        lines.insert(7 * i + 3, '{"input": "unterminated')
    path.write_text("\n".join(lines) + "\n")
    return texts


def config(tmp: Path, url: str, logs: Path, run_id: str, **teacher) -> dict:
    return {
        "run": {"name": "faults", "output_dir": str(tmp / "runs"), "run_id": run_id},
        "task": synthetic.TASK,
        "teacher": {
            "base_url": url,
            "model": "sim-teacher",
            "api_key_env": KEY_ENV,
            "max_tokens": 16,
            "actors": 2,
            "per_actor_concurrency": 8,
            "batch_size": 16,
            **teacher,
        },
        "data": {"logs": [{"path": str(logs)}]},
    }


def generate(data: dict, **options):
    cfg = load_config(data=data)
    return run_stages(cfg, ["generate"], cfg.run.run_id, options={"generate": options})


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")


def test_every_input_accounted_for_under_faults(ray_local, simulator, tmp_path):
    url = simulator(
        rule="quickstart",
        seed=3,
        latency_ms=5,
        rate_429=0.05,
        retry_after_s=0.2,
        rate_500=0.05,
        rate_503=0.05,
        rate_malformed=0.04,
        rate_unparsable=0.05,
        rate_hang=0.02,
        hang_s=5,
    )
    logs = tmp_path / "logs.jsonl"
    texts = write_logs(logs, 300, broken=4)
    run = generate(
        config(
            tmp_path,
            url,
            logs,
            "faults",
            timeout_s=1.0,
            max_attempts=4,
            backoff_base_s=0.05,
            backoff_max_s=0.2,
        )
    )
    rows = pq.read_table(run.dir / "generate" / "rows").to_pylist()
    assert len(rows) == 304  # one row per record, the 4 broken lines included
    assert len({(r["source"], r["source_line"]) for r in rows}) == 304
    assert {r["input"] for r in rows if r["status"] == OK} | {
        r["input"] for r in rows if r["reason"] and r["reason"].startswith("parse_error")
    } <= set(texts)
    by_reason = {}
    for r in rows:
        by_reason.setdefault((r["reason"] or "ok").split(":")[0], []).append(r)
    assert len(by_reason["malformed_record"]) == 4
    assert 5 <= len(by_reason["parse_error"]) <= 30  # the simulator's unparsable answers
    assert all(r["attempts"] <= 4 for r in rows if r["attempts"] is not None)
    for r in by_reason.get("teacher_error", []):  # gave up after the allowed attempts
        assert r["attempts"] == 4 and r["error_class"] and r["status"] == FAILED
    m = sim(url)
    assert m["requests"] <= 300 * 4  # retries are bounded
    assert m["requests"] > 300  # and faults were retried
    report = load_report(run.dir)["generate"]
    assert report["status"]["ok"] + report["status"]["failed"] == 304
    assert (run.dir / "generate" / "malformed.jsonl").read_text().count("\n") == 4


def _storm_run(tmp_path, url, run_id, storm_share):
    sim(url, "/metrics/reset", "POST")
    logs = tmp_path / f"{run_id}.jsonl"
    write_logs(logs, 300, seed=hash(run_id) % 1000)
    run = generate(
        config(
            tmp_path,
            url,
            logs,
            run_id,
            per_actor_concurrency=16,
            max_attempts=30,
            backoff_base_s=0.05,
            rate_limit={"storm_share": storm_share, "storm_window_s": 2.0},
            cache={"enabled": False},
        )
    )
    return sim(url), load_report(run.dir)["generate"]


# Out of the default run (under 15 min): a comparison of two timed runs: sensitive to machine load.
@pytest.mark.slow
def test_a_429_storm_slows_the_whole_pool(ray_local, simulator, tmp_path):
    """The server allows 40 requests/s per key; 32 requests in flight that only retry one by
    one keep hammering it, a pool that pauses and caps its rate on a storm does not. (300 rows:
    long enough for the capped rate to show over the storm's first seconds, which are noisy.)"""
    url = simulator(rule="quickstart", latency_ms=20, rpm_per_key=2400, rpm_burst=5)
    naive, naive_report = _storm_run(tmp_path, url, "naive", storm_share=None)
    pooled, pooled_report = _storm_run(tmp_path, url, "pooled", storm_share=0.3)
    assert pooled_report["status"] == {"ok": 300}  # the naive pool may run out of attempts
    assert pooled_report["quota"]["storms"] >= 1 and naive_report["quota"]["storms"] == 0
    assert pooled["rate_limited"] * 2 < naive["rate_limited"], (pooled, naive)


# Out of the default run (under 15 min): budget stops are also unit tests of the quota.
@pytest.mark.slow
def test_budget_stop_leaves_a_valid_partial_dataset_that_a_rerun_completes(
    ray_local, simulator, tmp_path
):
    url = simulator(rule="quickstart", latency_ms=5)
    logs = tmp_path / "logs.jsonl"
    write_logs(logs, 200)
    prices = {"sim-teacher": {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}}
    data = config(tmp_path, url, logs, "budget", prices=prices, budget={"max_cost_usd": 1.0})
    with pytest.raises(RunStopped, match="teacher budget reached in generate: max_cost_usd 1.0"):
        generate(data)
    run_dir = tmp_path / "runs" / "budget"
    rows = pq.read_table(run_dir / "generate" / "rows").to_pylist()
    done = [r for r in rows if r["status"] == OK]
    refused = [r for r in rows if r["status"] == FAILED]
    assert len(rows) == 200 and done and refused
    assert all(r["reason"].startswith("budget_exhausted") for r in refused)
    report = load_report(run_dir)["generate"]
    assert report["cost_usd"] <= 1.0 and report["budget_stop"]
    assert sum(r["cost"] for r in done) == pytest.approx(report["cost_usd"])
    sent = sim(url)["requests"]
    # A bigger budget and --retry-failed: only the refused rows are sent.
    data["teacher"]["budget"] = {"max_cost_usd": 100.0}
    generate(data, retry_failed=True)
    assert sim(url)["requests"] - sent == len(refused)
    again = pq.read_table(run_dir / "generate" / "rows").to_pylist()
    assert len(again) == 200 and all(r["status"] == OK for r in again)
    assert {r["id"]: r["response"] for r in again if r["id"] in {d["id"] for d in done}} == {
        d["id"]: d["response"] for d in done
    }


# Out of the default run (under 15 min): kills and restarts a whole generate run.
@pytest.mark.slow
def test_killed_run_resumes_repeating_at_most_1_percent_of_completed_calls(simulator, tmp_path):
    url = simulator(rule="quickstart", latency_ms=50)
    logs = tmp_path / "logs.jsonl"
    write_logs(logs, 2500, seed=9)
    data = config(tmp_path, url, logs, "killed", per_actor_concurrency=16)
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    cache_dir = tmp_path / "runs" / "cache" / "teacher"
    env = {**os.environ, KEY_ENV: "k"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "ray_pipeline.cli", "generate", str(cfg_path), "--run-id", "killed"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    try:
        while sim(url)["ok"] < 600:
            assert driver.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
    # Answers the killed run received: Ray's worker processes may outlive the driver by a
    # moment and still write a few, so count once the cache has stopped growing.
    completed, previous = -1, sum(1 for _ in cache_dir.rglob("*.json"))
    while completed != previous:
        time.sleep(2)
        completed, previous = sum(1 for _ in cache_dir.rglob("*.json")), completed
    assert 600 <= completed < 2500
    sent_before = sim(url)["requests"]
    rerun = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_pipeline.cli",
            "generate",
            str(cfg_path),
            "--run-id",
            "resumed",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rerun_calls = sim(url)["requests"] - sent_before
    repeated = rerun_calls - (2500 - completed)
    assert 0 <= repeated <= 0.01 * completed, (rerun_calls, completed)
    rows = pq.read_table(tmp_path / "runs" / "resumed" / "generate" / "rows").to_pylist()
    assert len(rows) == 2500 and all(r["status"] == OK for r in rows)
