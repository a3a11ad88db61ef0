"""Classifier loss options: balanced class weights (scikit-learn's formula) and label
smoothing, checked against torch's cross-entropy on a tiny classifier."""

from __future__ import annotations

import pytest
import torch

from ray_pipeline.config import ConfigError, TinyModelSection, TrainSection, load_config
from ray_pipeline.train.data import pad_batch
from ray_pipeline.train.loop import forward_loss
from ray_pipeline.train.model import build_tiny_model
from ray_pipeline.train.stage import class_weights
from ray_pipeline.train.tokenizer import build_tiny_tokenizer

LABELS = ["0", "1"]


def _train(**kw) -> TrainSection:
    return TrainSection.model_validate({"student": {"kind": "classifier"}, **kw})


def test_balanced_weights_make_each_class_weigh_the_same():
    rows = ["0"] * 30 + ["1"] * 10
    weights = class_weights(_train(class_weights="balanced"), rows, LABELS)
    assert weights == pytest.approx([40 / (2 * 30), 40 / (2 * 10)])
    # Each class's rows then add up to the same total weight.
    assert 30 * weights[0] == pytest.approx(10 * weights[1])
    assert class_weights(_train(), rows, LABELS) is None


def test_balanced_weights_need_every_label():
    with pytest.raises(ValueError, match=r"none has label\(s\) \['1'\]"):
        class_weights(_train(class_weights="balanced"), ["0"] * 5, LABELS)


def test_weighted_smoothed_loss_is_torchs_cross_entropy():
    tok = build_tiny_tokenizer(["a b c d e f g", "b c d a"] * 4, 64)
    tiny = TinyModelSection(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    model = build_tiny_model(tok, tiny, seed=0, kind="classifier", labels=LABELS)
    ids = [tok("a b c")["input_ids"], tok("d e")["input_ids"], tok("f g a b")["input_ids"]]
    batch = pad_batch(ids, [0, 1, 1], tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    plain = forward_loss(model, batch, _train())
    assert plain.item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, batch["labels"]).item(), rel=1e-5
    )
    options = _train(class_weights="balanced", label_smoothing=0.1)
    weighted = forward_loss(model, batch, options, [0.75, 1.5])
    expected = torch.nn.functional.cross_entropy(
        logits, batch["labels"], weight=torch.tensor([0.75, 1.5]), label_smoothing=0.1
    )
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)
    assert weighted.item() != pytest.approx(plain.item(), rel=1e-3)


def test_loss_options_are_for_classifiers_only():
    data = {
        "task": {"prompt": {"template": "Classify: {input}"}, "labels": LABELS},
        "teacher": {"simulator": {"enabled": True, "rule": "quickstart"}},
        "data": {"logs": [{"path": "x.jsonl"}]},
        "train": {"class_weights": "balanced", "label_smoothing": 0.6, "data_fraction": 0},
    }
    with pytest.raises(ConfigError) as exc:
        load_config(data=data)
    joined = "\n".join(exc.value.problems)
    assert "train.label_smoothing:" in joined and "train.data_fraction:" in joined
    data["train"] = {"class_weights": "balanced"}
    with pytest.raises(ConfigError, match="class_weights and label_smoothing are for classifier"):
        load_config(data=data)
