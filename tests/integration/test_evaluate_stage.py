"""The evaluate stage on a local Ray, with a tiny classifier student: one table of student,
majority and TF-IDF + logistic regression on a test set, metrics equal to scikit-learn's on
the student's own answers, the mistakes page with every error, report.md linking it."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from ray_pipeline.config import load_config
from ray_pipeline.data import synthetic
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.data.schema import dumps, new_row, row_id, to_table
from ray_pipeline.report import render_markdown
from ray_pipeline.run_state import Run
from ray_pipeline.train.student import Student
from tests.unit.test_evaluate_checkpoint import build_classifier_checkpoint

pytestmark = pytest.mark.integration


class Rows(HTMLParser):
    def __init__(self):
        super().__init__()
        self.kinds: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "tr" and "data-kind" in dict(attrs):
            self.kinds.append(dict(attrs)["data-kind"])


def test_evaluate_stage_scores_student_and_baselines(ray_local, tmp_path):
    from ray_pipeline.evaluate.stage import run_evaluate

    checkpoint = build_classifier_checkpoint(tmp_path / "student")
    prompt = Prompt(synthetic.PROMPT)
    train_texts = synthetic.generate_comments(120, seed=7)
    rows = [
        new_row(
            id=row_id("train", t),
            source="train",
            input=t,
            messages=dumps(prompt.messages(t)),
            label=synthetic.true_label(t),
        )
        for t in train_texts
    ]
    dataset = tmp_path / "dataset" / "train"
    dataset.mkdir(parents=True)
    pq.write_table(to_table(rows), dataset / "part-0.parquet")
    test_texts = synthetic.generate_comments(40, seed=123)
    test_file = tmp_path / "test.jsonl"
    test_file.write_text(
        "".join(
            json.dumps({"text": t, "label": synthetic.true_label(t)}) + "\n" for t in test_texts
        )
    )
    cfg = load_config(
        data={
            "task": synthetic.TASK,
            "teacher": {"simulator": {"enabled": True, "rule": "quickstart"}},
            "data": {"logs": [{"path": "unused.jsonl"}]},
            "evaluate": {
                "teacher": False,
                "test_sets": [{"name": "unseen", "path": str(test_file), "input_field": "text"}],
            },
        }
    )
    labels = [r["label"] for r in rows]
    (tmp_path / "report.json").write_text(
        json.dumps(
            {
                "curate": {
                    "outputs": {"train": str(dataset)},
                    "labels": {lab: labels.count(lab) for lab in set(labels)},
                },
                "train": {"checkpoint": checkpoint},
            }
        )
    )
    run = Run(cfg=cfg, run_id="test", dir=tmp_path)
    section = run_evaluate(run, None)

    ts = section["test_sets"]["unseen"]
    assert ts["models"] == ["student", "majority", "tfidf_logreg"]
    gold = [synthetic.true_label(t) for t in test_texts]
    answers = Student.load(checkpoint, device="cpu").answer(
        [prompt.messages(t) for t in test_texts]
    )
    predicted = [str(json.loads(a.text)["toxic"]) for a in answers]
    assert ts["accuracy"]["student"] == pytest.approx(accuracy_score(gold, predicted))
    assert ts["balanced_accuracy"]["student"] == pytest.approx(
        balanced_accuracy_score(gold, predicted)
    )
    assert ts["roc_auc"]["student"] == pytest.approx(
        roc_auc_score([g == "1" for g in gold], [a.probs["1"] for a in answers])
    )
    assert ts["roc_auc"]["majority"] is None and ts["roc_auc"]["tfidf_logreg"] is not None
    majority = max(set(labels), key=labels.count)
    assert ts["accuracy"]["majority"] == pytest.approx(gold.count(majority) / len(gold))
    # The synthetic rule is a word rule: a bag of words learns it from 100-odd rows.
    assert ts["accuracy"]["tfidf_logreg"] > ts["accuracy"]["majority"]
    errors = sum(p != g for p, g in zip(predicted, gold, strict=True))
    assert ts["mistakes"] == errors and ts["disagreements"] == 0
    page = Rows()
    page.feed(Path(ts["mistakes_page"]).read_text())
    assert page.kinds == ["error"] * errors
    md = render_markdown({"evaluate": section})
    assert "[Mistakes page](evaluate/unseen/mistakes.html)" in md
    assert "| unseen | tfidf_logreg | 40 |" in md
    assert (tmp_path / "evaluate" / "accuracy.png").stat().st_size > 1000
