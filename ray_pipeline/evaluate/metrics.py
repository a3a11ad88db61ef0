"""Evaluation metrics: label tasks against gold labels (scikit-learn), generative answers
against references, and the naive baselines (majority class; TF-IDF + logistic regression)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

UNPARSED = "<unparsed>"  # a prediction whose answer had no valid label: always wrong


def classification_metrics(
    gold: list[str],
    pred: list[str | None],
    labels: list[str],
    probs: list[dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class precision/recall/F1/support, the confusion
    matrix and, given every row's label probabilities (`probs`), ROC-AUC.

    A missing prediction (an answer with no valid label) counts as wrong for accuracy and as
    a miss for recall; it is reported as ``unparsed``. Balanced accuracy is the mean recall
    over the gold labels present. ROC-AUC is None when fewer than two gold labels occur (it is
    undefined); for two labels it scores the last label's probability, for more it is the
    one-vs-rest macro average."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        raise ValueError("no rows to score")
    if probs is not None and len(probs) != len(gold):
        raise ValueError(f"{len(gold)} gold labels but {len(probs)} probability rows")
    pred_s = [UNPARSED if p is None else p for p in pred]
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, pred_s, labels=labels, zero_division=0
    )
    cm = confusion_matrix(gold, pred_s, labels=[*labels, UNPARSED])
    present = [lab for lab in labels if lab in set(gold)]
    recalls = [float(r) for lab, r in zip(labels, recall, strict=True) if lab in present]
    return {
        "rows": len(gold),
        "accuracy": float(accuracy_score(gold, pred_s)),
        "balanced_accuracy": sum(recalls) / len(recalls),
        "roc_auc": roc_auc(gold, probs, labels) if probs is not None else None,
        "unparsed": sum(1 for p in pred if p is None),
        "per_class": {
            lab: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for lab, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        },
        "confusion": {"labels": [*labels, UNPARSED], "matrix": cm.tolist()},
    }


def roc_auc(gold: list[str], probs: list[dict[str, float]], labels: list[str]) -> float | None:
    """ROC-AUC of label probabilities (see ``classification_metrics``)."""
    if len(set(gold)) < 2:
        return None
    if len(labels) == 2:
        return float(roc_auc_score([g == labels[1] for g in gold], [p[labels[1]] for p in probs]))
    if set(gold) != set(labels):
        return None  # one-vs-rest needs every label among the gold labels
    matrix = [[p[lab] for lab in labels] for p in probs]
    return float(roc_auc_score(gold, matrix, multi_class="ovr", labels=labels))


def majority_label(label_counts: dict[str, int]) -> str:
    """The most frequent training label (ties: the first in sorted order, deterministic)."""
    if not label_counts:
        raise ValueError("no training labels to take a majority from")
    return min(label_counts, key=lambda lab: (-label_counts[lab], lab))


def label_counts(labels: list[str]) -> dict[str, int]:
    return dict(Counter(labels))


class TfidfBaseline:
    """TF-IDF word and bigram features + logistic regression, fitted on the student's own
    training rows: what a student must beat to be worth its GPU hours."""

    def __init__(self, texts: list[str], labels: list[str], seed: int = 0):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        if len(set(labels)) < 2:
            raise ValueError(
                f"the TF-IDF baseline needs at least two labels among its {len(labels)} "
                f"training rows, got {sorted(set(labels))}"
            )
        self.model = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True),
            LogisticRegression(max_iter=1000, random_state=seed),
        )
        self.model.fit(texts, labels)

    def predict(self, texts: list[str]) -> tuple[list[str], list[dict[str, float]]]:
        """(labels, every label's probability) per text; labels never seen in training get
        probability 0."""
        classes = [str(c) for c in self.model.classes_]
        rows = self.model.predict_proba(texts)
        probs = [dict(zip(classes, map(float, r), strict=True)) for r in rows]
        return [max(p, key=p.__getitem__) for p in probs], probs


# ------------------------------------------------------------------------------ generative
def exact_match(references: list[str], answers: list[str | None]) -> float:
    """Share of answers equal to their reference, ignoring surrounding whitespace and case."""
    _same_length(references, answers)
    return sum(
        a is not None and a.strip().casefold() == r.strip().casefold()
        for r, a in zip(references, answers, strict=True)
    ) / len(references)


def json_adherence(answers: list[str | None], schema: dict[str, Any] | None = None) -> float:
    """Share of answers that are one JSON value (valid against `schema` when given)."""
    import jsonschema

    if not answers:
        raise ValueError("no answers to score")
    validator = jsonschema.Draft202012Validator(schema) if schema is not None else None
    ok = 0
    for a in answers:
        try:
            value = json.loads(a) if a is not None else None
        except json.JSONDecodeError:
            continue
        if a is not None and (validator is None or validator.is_valid(value)):
            ok += 1
    return ok / len(answers)


def rouge_l(references: list[str], answers: list[str | None]) -> float:
    """Mean ROUGE-L F-measure (Google's rouge-score, stemmed) of answers against references."""
    from rouge_score import rouge_scorer

    _same_length(references, answers)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(
        scorer.score(r, a or "")["rougeL"].fmeasure
        for r, a in zip(references, answers, strict=True)
    ) / len(references)


def _same_length(references: list[str], answers: list[str | None]) -> None:
    if len(references) != len(answers):
        raise ValueError(f"{len(references)} references but {len(answers)} answers")
    if not references:
        raise ValueError("no rows to score")
