"""The binary classifier's decision threshold, chosen on validation rows."""

from __future__ import annotations

import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from ray_pipeline.train.threshold import choose_threshold, metric_value

TRUTH = [True, False, False, False, True, False, False, False, False, True]
PRED = [True, True, False, False, False, False, False, True, False, True]


@pytest.mark.parametrize(
    ("metric", "reference"),
    [
        ("accuracy", accuracy_score),
        ("balanced_accuracy", balanced_accuracy_score),
        ("f1", f1_score),
    ],
)
def test_metrics_match_scikit_learn(metric, reference):
    assert metric_value(metric, TRUTH, PRED) == pytest.approx(reference(TRUTH, PRED))


def test_the_threshold_follows_the_metric():
    # A rare positive class, one positive scored low among negatives: accuracy keeps only the
    # positive it is sure of; balanced accuracy reaches down for the other, false alarms and all.
    probs = [0.9, 0.3, 0.05, 0.1, 0.1, 0.15, 0.2, 0.25, 0.35, 0.4]
    truth = [True, True] + [False] * 8
    acc_th, acc = choose_threshold(probs, truth, "accuracy")
    bal_th, bal = choose_threshold(probs, truth, "balanced_accuracy")
    assert (acc_th, acc) == (0.5, 0.9)  # ties between 0.4 and 0.9 keep 0.5
    assert bal_th == pytest.approx(0.275) and bal == pytest.approx(0.875)
    predicted = [p >= bal_th for p in probs]
    assert metric_value("balanced_accuracy", truth, predicted) == bal


def test_ties_keep_the_untuned_default_and_degenerate_inputs():
    assert choose_threshold([0.2, 0.8], [False, True], "accuracy")[0] == 0.5
    assert choose_threshold([], [], "accuracy") == (0.5, 0.0)
    with pytest.raises(ValueError, match="unknown metric"):
        metric_value("auc", [True], [True])


def test_threshold_rows_leave_out_the_logs_gathered_for_balance():
    from ray_pipeline.config import LogSource
    from ray_pipeline.train.data import Example
    from ray_pipeline.train.stage import threshold_rows

    def ex(i: int, source: str | None) -> Example:
        return Example(id=str(i), messages=[], target="", label="0", source=source)

    logs = [
        LogSource(path="logs/production.csv"),
        LogSource(path="logs/extra_toxic.csv", in_distribution=False),
    ]
    val = [ex(0, "logs/production.csv"), ex(1, "logs/extra_toxic.csv"), ex(2, "seeds.jsonl")]
    rows, excluded = threshold_rows(val, logs)
    assert [r.id for r in rows] == ["0", "2"] and excluded == ["logs/extra_toxic.csv"]
    # Every log in distribution (the default): every row.
    assert threshold_rows(val, logs[:1]) == (val, [])
    # Nothing left once the balance rows are out: all rows, rather than no threshold.
    assert threshold_rows(val[1:2], logs) == (val[1:2], [])
