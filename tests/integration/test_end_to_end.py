"""One `distill run` of the whole loop (the `e2e_run` fixture), checked stage by stage."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_pipeline.config import LogSource, load_config
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.data.schema import OK
from ray_pipeline.data.sources import log_rows
from ray_pipeline.run_state import STAGES, load_report

pytestmark = pytest.mark.integration


def test_report_has_every_stage_and_the_student_learned(e2e_run):
    report = load_report(e2e_run)
    assert set(STAGES) <= set(report)
    acc = report["evaluate"]["test_sets"]["quickstart"]["accuracy"]
    assert acc["student"] > acc["majority"] + 0.2, acc  # it learned the task
    assert set(acc) == {"student", "teacher", "majority", "tfidf_logreg"}
    assert 0.8 < acc["teacher"] < 0.98  # the simulated teacher is wrong on ~10%
    assert report["evaluate"]["checkpoint_from"] == "sweep.best"
    md = (e2e_run / "report.md").read_text()
    assert "| quickstart | student | 200 |" in md and "| quickstart | tfidf_logreg | 200 |" in md
    assert "[Mistakes page](evaluate/quickstart/mistakes.html)" in md
    assert (e2e_run / "evaluate" / "quickstart" / "mistakes.html").stat().st_size > 1000
    for png in ("evaluate/accuracy.png", "train/loss.png", "sweep/ablation.png"):
        assert (e2e_run / png).stat().st_size > 1000, png


def test_every_input_record_is_one_row(e2e_run, root):
    report = load_report(e2e_run)
    gen, cur = report["generate"], report["curate"]
    log_records = sum(
        1
        for line in (root / "configs/data/quickstart/logs.jsonl").read_text().splitlines()
        if line.strip()
    )
    assert gen["rows"] == log_records + gen["synthetic"]["kept"]
    assert gen["malformed_records"] == 2 and gen["status"]["failed"] >= 2
    # Every token the teacher was paid for is on a row or in the seed expansion's count.
    assert gen["prompt_tokens"] + gen["completion_tokens"] == gen["quota"]["tokens"] > 0
    assert gen["quota"]["over_estimate"] == 0
    assert cur["rows_in"] == gen["rows"] == cur["kept"] + cur["filtered"] + cur["failed"]
    kept = pq.read_table(cur["outputs"]["train"])
    rejected = pq.read_table(cur["outputs"]["rejected"]).to_pylist()
    assert kept.num_rows == cur["kept"] and all(r["reason"] for r in rejected)
    assert cur["reasons"]["duplicate"] >= 5  # the re-sent inputs of the logs
    manifest = json.loads((e2e_run / "dataset" / "manifest.json").read_text())
    assert (
        manifest["rows"] == cur["kept"]
        and manifest["content_sha256"]
        and manifest["sources"][0]["sha256"]
    )
    checkpoint = Path(report["train"]["checkpoint"])
    # copied from the bucket Ray Train wrote it to (run.output_dir on a URI)
    assert checkpoint == e2e_run / "train" / "checkpoint"
    ckpt = json.loads((checkpoint / "distill_checkpoint.json").read_text())
    assert ckpt["manifest"] == str(e2e_run / "dataset" / "manifest.json")
    # What `distill evaluate CHECKPOINT --data FILE` reads to know how to score it.
    assert ckpt["task_kind"] == "label" and ckpt["output_schema"] is None


def test_serve_split_traffic_and_logged_every_request(two_node_job, e2e_run, root, in_root):
    serve = load_report(e2e_run)["serve"]
    assert serve["requests"] == 12 and serve["errors"] == 0
    assert serve["answered_by"].get("student", 0) >= 6 and sum(serve["answered_by"].values()) == 12
    # in the bucket (read there by the fixture): one object per replica and flush
    files = serve["request_log_files"]
    assert files and all(f.startswith(f"{serve['request_log']}/") for f in files)
    log_lines = b"".join(two_node_job.request_log[f] for f in files)
    records = [json.loads(x) for x in log_lines.splitlines()]
    assert len(records) == 12 and all(r["status"] == 200 for r in records)
    # The request log is the next round's input: it reads as a log, teacher answers kept.
    cfg = load_config(root / "configs/quickstart.yaml")
    rows = log_rows(
        io.BytesIO(log_lines),
        "requests.jsonl",
        LogSource(path="requests.jsonl"),
        Prompt.from_task(cfg.task),
        cfg.task,
    )
    rows = list(rows)
    assert [r["status"] for r in rows] == [OK] * 12
    assert sum(r["response"] is not None for r in rows) == serve["answered_by"].get("teacher", 0)
