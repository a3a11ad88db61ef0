"""Generate + curate on local Ray over logs with every kind of flaw: each row's fate and the
manifest."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from ray_pipeline.config import load_config
from ray_pipeline.data import synthetic
from ray_pipeline.pipeline import run_stages

pytestmark = pytest.mark.integration


def test_curate_keeps_good_rows_and_says_why_it_dropped_the_rest(
    ray_local, simulator, tmp_path, monkeypatch
):
    url = simulator(rule="quickstart", error_rate=0)
    monkeypatch.setenv("CURATE_KEY", "k")
    good = synthetic.generate_comments(20, seed=4)
    test_input = "This article is clearly fine, thanks"
    records = [{"input": t} for t in good]
    records += [
        {"input": good[0].upper() + "  "},  # a duplicate up to case and spaces
        {"input": "see http://spam.example for more"},  # excluded pattern
        {"input": "ok"},  # too short
        {"input": test_input},  # in the test set
        {"input": "recorded answer, wrong key", "answer": '{"verdict": 1}'},
        {"input": "recorded answer, not a label", "answer": '{"toxic": 7}'},
        {"input": "recorded answer, no structure", "answer": "I think it is fine."},
    ]
    logs = tmp_path / "logs.jsonl"
    logs.write_text("\n".join(json.dumps(r) for r in records) + "\n{broken\n")
    test_set = tmp_path / "test.jsonl"
    test_set.write_text(json.dumps({"input": test_input.lower(), "label": "0"}) + "\n")
    cfg = load_config(
        data={
            "run": {"name": "cur", "output_dir": str(tmp_path / "runs"), "run_id": "cur"},
            "task": synthetic.TASK,
            "teacher": {"base_url": url, "api_key_env": "CURATE_KEY", "cache": {"enabled": False}},
            "data": {"logs": [{"path": str(logs), "response_field": "answer"}]},
            "curate": {"rules": {"min_chars": 5, "deny_patterns": ["https?://"]}},
            "evaluate": {"test_sets": [{"name": "held", "path": str(test_set)}]},
        }
    )
    run = run_stages(cfg, ["generate", "curate"], "cur")
    report = json.loads((run.dir / "report.json").read_text())["curate"]
    assert report["rows_in"] == 28 and report["kept"] == 20
    assert report["reasons"] == {
        "duplicate": 1,
        "excluded_pattern": 1,
        "too_short": 1,
        "test_overlap": 1,
        "missing_label": 1,
        "invalid_label": 1,
        "parse_error": 1,
        "malformed_record": 1,
    }
    kept = pq.read_table(run.dir / "dataset" / "train").to_pylist()
    assert sorted(r["input"] for r in kept) == sorted(good)
    assert all(r["label"] == synthetic.true_label(r["input"]) for r in kept)
    rejected = {
        r["input"]: r["reason"] for r in pq.read_table(run.dir / "dataset" / "rejected").to_pylist()
    }
    assert rejected[test_input] == "test_overlap: input is in test set 'held'"
    assert rejected["recorded answer, not a label"].startswith("invalid_label: 7")
    manifest = json.loads((run.dir / "dataset" / "manifest.json").read_text())
    assert manifest["counts"] == {"in": 28, "ok": 20, "filtered": 6, "failed": 2}
    assert (
        manifest["settings"]["rules"]["deny_patterns"] == ["https?://"]
        and manifest["labels"] == report["labels"]
    )
