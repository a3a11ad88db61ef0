"""Classification metrics against gold labels (scikit-learn), and the naive baseline."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

UNPARSED = "<unparsed>"  # a prediction whose answer had no valid label: always wrong


def classification_metrics(
    gold: list[str], pred: list[str | None], labels: list[str]
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix.

    A missing prediction (an answer with no valid label) counts as wrong for accuracy and as
    a miss for recall; it is reported as ``unparsed``."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        raise ValueError("no rows to score")
    pred_s = [UNPARSED if p is None else p for p in pred]
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, pred_s, labels=labels, zero_division=0
    )
    cm = confusion_matrix(gold, pred_s, labels=[*labels, UNPARSED])
    return {
        "rows": len(gold),
        "accuracy": float(accuracy_score(gold, pred_s)),
        "unparsed": sum(1 for p in pred if p is None),
        "per_class": {
            lab: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for lab, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        },
        "confusion": {"labels": [*labels, UNPARSED], "matrix": cm.tolist()},
    }


def majority_label(label_counts: dict[str, int]) -> str:
    """The most frequent training label (ties: the first in sorted order, deterministic)."""
    if not label_counts:
        raise ValueError("no training labels to take a majority from")
    return min(label_counts, key=lambda lab: (-label_counts[lab], lab))


def label_counts(labels: list[str]) -> dict[str, int]:
    return dict(Counter(labels))
