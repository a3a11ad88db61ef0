from __future__ import annotations

import pytest

from ray_pipeline.evaluate.metrics import UNPARSED, classification_metrics, majority_label


def test_metrics_with_unparsed_predictions():
    m = classification_metrics(["1", "1", "0", "0"], ["1", None, "0", "1"], ["0", "1"])
    assert m["accuracy"] == 0.5 and m["unparsed"] == 1 and m["rows"] == 4
    assert m["per_class"]["1"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["0"]["recall"] == 0.5 and m["per_class"]["0"]["precision"] == 1.0
    assert m["confusion"]["labels"] == ["0", "1", UNPARSED]
    assert m["confusion"]["matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 0]]


def test_metrics_errors():
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        classification_metrics(["0", "1"], ["0"], ["0", "1"])
    with pytest.raises(ValueError, match="no rows"):
        classification_metrics([], [], ["0", "1"])


def test_majority_label_is_deterministic():
    assert majority_label({"0": 5, "1": 3}) == "0"
    assert majority_label({"b": 2, "a": 2}) == "a"
    with pytest.raises(ValueError):
        majority_label({})
