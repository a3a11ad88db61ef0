"""Real teacher logs: the Jigsaw CSVs with GPT-4's recorded answers, read by the generate
stage of configs/jigsaw.yaml (recorded answers are used, not re-sent)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from ray_pipeline.config import load_config
from ray_pipeline.pipeline import run_stages

pytestmark = pytest.mark.integration


def test_recorded_gpt4_answers_become_labels_without_calls(
    ray_local, jigsaw_dir, in_root, tmp_path
):
    cfg = load_config(
        "configs/jigsaw.yaml",
        [
            f"run.output_dir={tmp_path}",
            "run.run_id=jig",
            f"task.prompt.file={jigsaw_dir / 'prompt.simple.txt'}",
            "teacher.simulator.replay=[]",  # every answer is in the log: nothing to replay
            f"data.logs.0.path={jigsaw_dir / 'train.A.gpt-4.responses.csv'}",
            "data.logs.0.limit=300",
            "evaluate.test_sets=[]",
        ],
    )
    run = run_stages(cfg, ["generate", "curate"], "jig")
    rows = pq.read_table(run.dir / "generate" / "rows").to_pylist()
    assert len(rows) == 300 and all(r["status"] == "ok" for r in rows)
    assert all(r["teacher"] == "recorded:simple_prompt" and r["attempts"] is None for r in rows)
    assert all(r["label"] in ("0", "1") and r["gold"] in ("0", "1") for r in rows)
    agree = sum(r["label"] == r["gold"] for r in rows) / len(rows)
    assert 0.85 < agree < 0.99  # GPT-4 agrees with gold on ~94% of set A
    report = json.loads((run.dir / "report.json").read_text())
    assert (
        report["generate"]["teacher_calls"] == 0 and report["generate"]["recorded_responses"] == 300
    )
    assert report["curate"]["rows_in"] == 300
