"""Evaluation metrics against scikit-learn (and rouge-score) on fixed inputs."""

from __future__ import annotations

import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from ray_pipeline.evaluate.metrics import (
    UNPARSED,
    TfidfBaseline,
    classification_metrics,
    exact_match,
    json_adherence,
    majority_label,
    rouge_l,
)

GOLD = ["0", "1", "1", "0", "2", "2", "1", "0", "2", "1"]
PRED = ["0", "1", "0", "0", "2", "1", "1", "2", "2", "1"]
LABELS = ["0", "1", "2"]


def test_label_metrics_equal_scikit_learns():
    m = classification_metrics(GOLD, PRED, LABELS)
    assert m["accuracy"] == pytest.approx(accuracy_score(GOLD, PRED)) == 0.7
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(GOLD, PRED))
    for lab in LABELS:
        pc = m["per_class"][lab]
        assert pc["precision"] == pytest.approx(
            precision_score(GOLD, PRED, labels=[lab], average="macro")
        )
        assert pc["recall"] == pytest.approx(
            recall_score(GOLD, PRED, labels=[lab], average="macro")
        )
        assert pc["f1"] == pytest.approx(f1_score(GOLD, PRED, labels=[lab], average="macro"))
    assert m["roc_auc"] is None  # no probabilities given


def test_roc_auc_binary_and_multiclass_equal_scikit_learns():
    gold = ["0", "1", "1", "0", "1", "0"]
    p1 = [0.2, 0.9, 0.4, 0.6, 0.7, 0.1]
    probs = [{"0": 1 - p, "1": p} for p in p1]
    m = classification_metrics(gold, ["0", "1", "0", "1", "1", "0"], ["0", "1"], probs)
    assert m["roc_auc"] == pytest.approx(roc_auc_score([int(g) for g in gold], p1)) == 8 / 9
    rows = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]
    rows += [[0.2, 0.2, 0.6], [0.3, 0.4, 0.3], [0.2, 0.1, 0.7], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]]
    probs3 = [dict(zip(LABELS, r, strict=True)) for r in rows]
    m3 = classification_metrics(GOLD, PRED, LABELS, probs3)
    assert m3["roc_auc"] == pytest.approx(
        roc_auc_score(GOLD, rows, multi_class="ovr", labels=LABELS)
    )
    # One gold class only: ROC-AUC is undefined, not an error.
    assert classification_metrics(["1", "1"], ["1", "0"], ["0", "1"], probs[:2])["roc_auc"] is None


def test_metrics_with_unparsed_predictions():
    m = classification_metrics(["1", "1", "0", "0"], ["1", None, "0", "1"], ["0", "1"])
    assert m["accuracy"] == 0.5 and m["unparsed"] == 1 and m["rows"] == 4
    # Unparsed is a miss of its gold class: mean recall of (1/2, 1/2).
    assert m["balanced_accuracy"] == 0.5
    assert m["per_class"]["1"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["0"]["recall"] == 0.5 and m["per_class"]["0"]["precision"] == 1.0
    assert m["confusion"]["labels"] == ["0", "1", UNPARSED]
    assert m["confusion"]["matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 0]]


def test_metrics_errors():
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        classification_metrics(["0", "1"], ["0"], ["0", "1"])
    with pytest.raises(ValueError, match="no rows"):
        classification_metrics([], [], ["0", "1"])
    with pytest.raises(ValueError, match="2 gold labels but 1 probability rows"):
        classification_metrics(["0", "1"], ["0", "1"], ["0", "1"], [{"0": 1.0, "1": 0.0}])


def test_majority_label_is_deterministic():
    assert majority_label({"0": 5, "1": 3}) == "0"
    assert majority_label({"b": 2, "a": 2}) == "a"
    with pytest.raises(ValueError):
        majority_label({})


def test_tfidf_baseline_learns_words_and_gives_probabilities():
    texts = ["you idiot", "idiot again", "stupid idiot", "thanks friend", "nice edit", "thanks"]
    labels = ["1", "1", "1", "0", "0", "0"]
    pred, probs = TfidfBaseline(texts, labels).predict(["what an idiot", "thanks a lot"])
    assert pred == ["1", "0"]
    assert all(set(p) == {"0", "1"} and abs(sum(p.values()) - 1) < 1e-9 for p in probs)
    with pytest.raises(ValueError, match="at least two labels"):
        TfidfBaseline(["a", "b"], ["1", "1"])


def test_generative_metrics():
    from rouge_score import rouge_scorer

    refs = ["The cat sat on the mat", "Paris", '{"a": 1}']
    answers = ["the cat sat on a mat", " paris ", None]
    assert exact_match(refs, answers) == pytest.approx(1 / 3)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = (
        scorer.score(refs[0], answers[0])["rougeL"].fmeasure
        + 1.0
        + scorer.score(refs[2], "")["rougeL"].fmeasure
    ) / 3
    assert rouge_l(refs, answers) == pytest.approx(expected)
    # By hand: LCS 5 of 6 tokens each way ("the cat sat on mat") -> F = 5/6.
    assert rouge_l(refs[:1], answers[:1]) == pytest.approx(5 / 6)
    schema = {
        "type": "object",
        "required": ["answer"],
        "properties": {"answer": {"type": "string"}},
    }
    outs = ['{"answer": "x"}', '{"answer": 3}', "not json", None, '{"answer": "y", "n": 1}']
    assert json_adherence(outs) == pytest.approx(3 / 5)
    assert json_adherence(outs, schema) == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="2 references but 1 answers"):
        exact_match(["a", "b"], ["a"])
