"""The decision threshold of a binary classifier student, chosen on the validation split.

A classifier says the positive label when that label's probability reaches the threshold.
0.5 is right only when the training labels' class balance is the one the student will meet;
the playbook's balanced and in-distribution test sets pull in different directions. The
threshold that maximises the configured metric on the validation rows (teacher labels, never
a test set; rows of logs gathered for balance, ``data.logs[].in_distribution: false``, left out
by ``train.stage.threshold_rows``) is stored in the checkpoint and used at inference.
"""

from __future__ import annotations

from collections.abc import Sequence


def metric_value(metric: str, truth: Sequence[bool], predicted: Sequence[bool]) -> float:
    """accuracy, balanced_accuracy (mean of the two classes' recall) or f1 of the positive
    class, for boolean truth and predictions."""
    tp = sum(t and p for t, p in zip(truth, predicted, strict=True))
    tn = sum(not t and not p for t, p in zip(truth, predicted, strict=True))
    pos = sum(truth)
    neg = len(truth) - pos
    if metric == "accuracy":
        return (tp + tn) / len(truth) if truth else 0.0
    if metric == "balanced_accuracy":
        recalls = [
            r for r, n in ((tp / pos if pos else None, pos), (tn / neg if neg else None, neg)) if n
        ]
        return sum(recalls) / len(recalls) if recalls else 0.0
    if metric == "f1":
        predicted_pos = sum(predicted)
        return 2 * tp / (pos + predicted_pos) if pos + predicted_pos else 0.0
    raise ValueError(f"unknown metric {metric!r}: expected accuracy, balanced_accuracy or f1")


def choose_threshold(
    positive_probs: Sequence[float], truth: Sequence[bool], metric: str
) -> tuple[float, float]:
    """(threshold, metric value) maximising `metric` when predicting positive for
    probability >= threshold. Candidates are midpoints between consecutive distinct
    probabilities (and 0.5); ties go to the candidate closest to 0.5, the untuned default."""
    if len(positive_probs) != len(truth):
        raise ValueError("positive_probs and truth differ in length")
    if not truth:
        return 0.5, 0.0
    distinct = sorted(set(positive_probs))
    candidates = {0.5}
    candidates.update((a + b) / 2 for a, b in zip(distinct, distinct[1:], strict=False))
    candidates.add(distinct[0] / 2)  # everything positive
    candidates.add((distinct[-1] + 1) / 2)  # everything negative
    best: tuple[float, float, float] | None = None  # (value, -distance to 0.5, threshold)
    for th in candidates:
        value = metric_value(metric, truth, [p >= th for p in positive_probs])
        key = (value, -abs(th - 0.5), th)
        if best is None or key > best:
            best = key
    return best[2], best[0]
