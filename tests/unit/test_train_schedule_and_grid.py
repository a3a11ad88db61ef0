"""LR schedule and step counting of the worker loop; the sweep grid and its trial configs."""

from __future__ import annotations

import pytest

from ray_pipeline.config import SweepSection, TrainSection
from ray_pipeline.sweep.analysis import grid_points, pick_best, trial_train_section
from ray_pipeline.sweep.stage import check_sweep
from ray_pipeline.train.loop import lr_factor, schedule_steps


def test_linear_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, total_steps=10, warmup_steps=2, schedule="linear") for s in range(11)]
    assert factors[:3] == [0.0, 0.5, 1.0]
    assert factors[2:] == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0])
    assert lr_factor(0, total_steps=4, warmup_steps=0, schedule="linear") == 1.0
    assert lr_factor(7, total_steps=4, warmup_steps=0, schedule="linear") == 0.0  # never negative


def test_cosine_schedule_matches_transformers():
    import torch
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=20)
    ours = [lr_factor(s, total_steps=20, warmup_steps=3) for s in range(21)]
    theirs = [reference.lr_lambdas[0](s) for s in range(21)]
    assert ours == pytest.approx(theirs) and ours[-1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(5, 10, 0, "step")


def test_schedule_steps_counts_equal_shards_and_accumulation():
    train = TrainSection(batch_size=8, epochs=3)
    # 101 rows over 2 workers: 50 each (the remainder row is dropped), 7 micro-batches each.
    assert schedule_steps(train, 101, 2) == 7 * 3
    assert (
        schedule_steps(TrainSection(batch_size=8, epochs=3, gradient_accumulation_steps=2), 101, 2)
        == 10
    )
    assert schedule_steps(TrainSection(batch_size=8, epochs=3, max_steps=5), 101, 2) == 5
    assert (
        schedule_steps(TrainSection(batch_size=8, epochs=1, gradient_accumulation_steps=16), 16, 1)
        == 1
    )


def test_grid_is_the_product_of_set_lists():
    sweep = SweepSection(learning_rate=[1e-3, 3e-3], lora_r=[4, 8], fractions=[1.0, 0.5])
    assert sweep.swept == ["learning_rate", "lora_r"] and sweep.fractions == [0.5, 1.0]
    points = grid_points(sweep)
    assert len(points) == 4
    assert {"learning_rate": 3e-3, "lora_r": 8} in points
    assert grid_points(SweepSection()) == [{}]  # the train settings alone


def test_trial_section_overrides_only_swept_values():
    base = TrainSection(
        learning_rate=1e-3,
        epochs=2,
        batch_size=16,
        lora={"r": 8, "alpha": 16, "modules_to_save": ["lm_head"]},
    )
    t = trial_train_section(
        base, {"learning_rate": 5e-3, "lora_alpha": 4, "epochs": 1, "fraction": 0.5}
    )
    assert (t.learning_rate, t.lora.alpha, t.epochs) == (5e-3, 4, 1)
    assert (t.batch_size, t.lora.r, t.lora.modules_to_save) == (16, 8, ["lm_head"])
    assert base.learning_rate == 1e-3  # the base is not modified


def test_sweep_checks_and_best():
    with pytest.raises(ValueError, match="need train.method 'lora'"):
        check_sweep(SweepSection(lora_r=[4]), TrainSection(method="full"))
    trials = [{"val_loss": 0.3}, {"val_loss": None}, {"val_loss": 0.1}]
    assert pick_best(trials, "val_loss") == {"val_loss": 0.1}
    accuracies = [{"val_accuracy": 0.7}, {"val_accuracy": 0.9}, {"val_accuracy": 0.9}]
    assert pick_best(accuracies, "val_accuracy", "max") is accuracies[1]  # ties: the first
    with pytest.raises(RuntimeError, match="no sweep trial reported"):
        pick_best([{"val_loss": None}], "val_loss")


@pytest.mark.parametrize("bad", [[], [0.0], [-1]])
def test_sweep_lists_must_hold_positive_values(bad):
    with pytest.raises(ValueError, match="non-empty list of values > 0"):
        SweepSection(learning_rate=bad)
