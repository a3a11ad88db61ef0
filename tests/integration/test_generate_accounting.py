"""The money path of the generate stage, end to end on local Ray with the simulator: every
token and cent the quota counted is on a row or in the seed expansion's count, exactly."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from ray_pipeline.config import load_config
from ray_pipeline.data import synthetic
from ray_pipeline.pipeline import run_stages
from ray_pipeline.run_state import load_report
from ray_pipeline.teacher.quota import from_pico, to_pico

pytestmark = pytest.mark.integration


def test_report_cost_and_tokens_equal_the_quotas_spend(ray_local, tmp_path):
    logs = tmp_path / "logs.jsonl"
    texts = synthetic.generate_comments(60, seed=7)
    texts[3] = texts[3] * 40  # one long input among short ones
    logs.write_text("".join(json.dumps({"input": t}) + "\n" for t in texts))
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"input": s}) + "\n" for s in synthetic.SEEDS))
    cfg = load_config(
        data={
            "run": {"name": "money", "output_dir": str(tmp_path / "runs"), "run_id": "money"},
            "task": synthetic.TASK,
            "teacher": {
                "model": "sim-teacher",
                "max_tokens": 24,
                "max_attempts": 1,
                "prices": {"sim-teacher": {"input_per_mtok": 2.5, "output_per_mtok": 10.0}},
                "voters": [{"name": "again", "n": 3, "temperature": 0.8}],
                # 500s without retries: some rows lose their main answer, keep their voter's.
                "simulator": {"enabled": True, "rule": "quickstart", "rate_500": 0.2},
            },
            "data": {"logs": [{"path": str(logs)}], "seeds": {"path": str(seeds), "n_new": 30}},
        }
    )
    run = run_stages(cfg, ["generate"], "money")
    gen = load_report(run.dir)["generate"]
    quota = gen["quota"]
    assert quota["over_estimate"] == 0 and quota["cost_usd"] > 0
    assert gen["cost_usd"] == quota["cost_usd"]  # to the pico-dollar
    assert gen["prompt_tokens"] + gen["completion_tokens"] == quota["tokens"]
    expansion = gen["synthetic"]
    assert expansion["requests"] == 3 and expansion["cost_usd"] > 0
    rows = pq.read_table(run.paths.generated_rows).to_pylist()
    assert len(rows) == 60 + expansion["kept"]
    rows_pico = sum(to_pico(r["cost"]) for r in rows)
    assert from_pico(rows_pico + to_pico(expansion["cost_usd"])) == quota["cost_usd"]
    failed_with_votes = [r for r in rows if r["status"] == "failed" and r["cost"]]
    assert failed_with_votes, "no row lost its main answer and kept a voter's"
