"""`distill run configs/qa_seeds.yaml`, smaller, as a user runs it: a generative task from a few
seed questions through the whole loop, offline (the simulator's qa rule answers and judges)."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser

import pyarrow.parquet as pq
import pytest

from ray_pipeline.data import qa
from ray_pipeline.data.sources import read_texts

from .conftest import ROOT

# 3 to 6 minutes on 2 shared CPU cores (train alone ~70 s: Ray Train's start-up and two
# epochs' checkpoints), so out of the default run: `python -m pytest -m slow` runs it.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEST_ROWS = 10


class _Rows(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows = 0

    def handle_starttag(self, tag, attrs):
        self.rows += tag == "tr" and ("data-kind", "error") in attrs


def test_qa_seeds_runs_a_generative_task_end_to_end(tmp_path):
    cmd = [
        sys.executable, "-m", "ray_pipeline.cli", "run", "configs/qa_seeds.yaml",
        "--set", f"run.output_dir={tmp_path}", "--set", "run.run_id=qa",
        "--set", "data.seeds.n_new=60", "--set", "train.epochs=2",
        "--set", "curate.test_sets.build.0.rows=8",
        "--set", f"evaluate.test_sets.0.limit={TEST_ROWS}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    run = tmp_path / "qa"
    report = json.loads((run / "report.json").read_text())

    gen, cur = report["generate"], report["curate"]
    assert gen["synthetic"]["kept"] > 40 and gen["rows"] == gen["synthetic"]["kept"]
    # Every generated row ends once: kept, filtered (with its reason) or failed.
    assert cur["rows_in"] == gen["rows"] == cur["kept"] + cur["filtered"] + cur["failed"]
    assert cur["reasons"]["held_out"] == 8
    assert cur["judge"]["judged"] > 0
    # The teacher's answers that drift from the schema (another key) are dropped with it.
    train = pq.read_table(run / "dataset" / "train").to_pylist()
    assert train and all(json.loads(r["output"]).keys() == {"answer"} for r in train)
    rejected = pq.read_table(run / "dataset" / "rejected").to_pylist()
    drifted = [r for r in rejected if (r["reason"] or "").startswith("schema_invalid")]
    assert all('"response"' in r["response"] for r in drifted)
    prose = [r for r in rejected if (r["reason"] or "").startswith("parse_error")]
    assert all(r["response"].startswith("The answer is") for r in prose)

    ev = report["evaluate"]
    assert ev["kind"] == "generative" and set(ev["test_sets"]) == {"truth", "heldout"}
    truth, heldout = ev["test_sets"]["truth"], ev["test_sets"]["heldout"]
    assert truth["rows"] == TEST_ROWS and heldout["rows"] == 8
    assert truth["models"] == ["student", "teacher", "frequent_answer", "echo"]
    # The teacher against the right answers: the qa rule's errors and format drifts (prose,
    # another key), exactly.
    questions = [r["input"] for r in read_texts(ROOT / "configs/data/qa_seeds/test.jsonl", "input")]
    right = [
        qa.teacher_answer(q, 0.1) == qa.true_answer(q)
        and '"answer"' in qa.format_answer(qa.true_answer(q), q)
        for q in questions[:TEST_ROWS]
    ]
    assert truth["metrics"]["teacher"]["exact_match"] == sum(right) / TEST_ROWS
    # On the held-out rows the reference is the teacher's own answer.
    assert heldout["metrics"]["teacher"]["exact_match"] == 1.0
    assert heldout["metrics"]["teacher"]["judge_score"] == 5.0
    for m in (truth["metrics"]["teacher"], truth["metrics"]["student"]):
        assert m["judge_failed"] == 0 and 1 <= m["judge_score"] <= 5
        assert 0 <= m["rouge_l"] <= 1 and 0 <= m["json_adherence"] <= 1
    echo = truth["metrics"]["echo"]  # a question is no JSON answer
    assert echo["unparsed"] == TEST_ROWS and echo["json_adherence"] == 0 == echo["exact_match"]

    student = truth["metrics"]["student"]
    errors = round(TEST_ROWS * (1 - student["exact_match"]))
    page = (run / "evaluate" / "truth" / "mistakes.html").read_text()
    parser = _Rows()
    parser.feed(page)
    assert parser.rows == truth["mistakes"] == errors
    md = (run / "report.md").read_text()
    assert "## Evaluation (against reference answers)" in md
    assert "| frequent_answer |" in md and "evaluate/truth/mistakes.html" in md

    # The run's checkpoint scored standalone on the same test file, with the run config's
    # judge: the checkpoint carries its task (kind, prompt, output schema), and the scores are
    # the evaluate stage's (the same greedy answers, the same functions, the same judge).
    cmd = [
        sys.executable, "-m", "ray_pipeline.cli", "evaluate", ev["checkpoint"],
        "--data", "configs/data/qa_seeds/test.jsonl", "--text-column", "input",
        "--label-column", "reference", "--limit", str(TEST_ROWS), "--max-new-tokens", "24",
        "--judge", "configs/qa_seeds.yaml", "--json",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = json.loads(proc.stdout)
    assert alone["task_kind"] == "generative" and alone["output_schema"] == qa.OUTPUT_SCHEMA
    assert alone["judge"]["run"] and alone["judge"]["failed"] == 0
    for key in ("rows", "exact_match", "json_adherence", "rouge_l", "unparsed", "judge_score"):
        assert alone[key] == pytest.approx(student[key]), key
