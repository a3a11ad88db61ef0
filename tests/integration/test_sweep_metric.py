"""A 2-trial sweep of a tiny classifier student that picks its best trial by val_accuracy
(higher is better), on a local Ray."""

from __future__ import annotations

import pytest

from tests.integration.test_sweep import TRAIN, curated_run

# Two TorchTrainer trials: over a minute on 2 cores (about 5 min on a loaded machine), so
# out of the default run; the default run covers val_accuracy's parts without Ray (the
# metric, the config checks, best/ablation/plots by mode) and the loop computing it (the
# classifier student of tests/integration/test_train_stage.py).
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_sweep_picks_the_trial_with_the_highest_val_accuracy(ray_local, tmp_path):
    from ray import tune

    from ray_pipeline.report import render_markdown
    from ray_pipeline.sweep.stage import run_sweep, run_trial
    from ray_pipeline.train.checkpoint import read_meta

    train = {
        **TRAIN,
        "student": {**TRAIN["student"], "kind": "classifier"},
        "lora": {"r": 8, "alpha": 16, "modules_to_save": ["embed_tokens"]},
        "epochs": 3,
    }
    # 1e-5 barely moves the weights in 3 epochs; 0.005 learns the task.
    sweep = {"learning_rate": [1e-5, 0.005], "metric": "val_accuracy", "mlflow": False}
    run = curated_run(tmp_path, train, sweep, n_rows=96)
    section = run_sweep(run)

    trials = section["trials"]
    assert [t["config"]["learning_rate"] for t in trials] == [1e-5, 0.005]
    assert section["metric"] == "val_accuracy" and section["mode"] == "max"
    val_rows = read_meta(trials[0]["checkpoint"])["metrics"]["val_rows"]
    for t in trials:
        # A share of the validation rows, reported every epoch beside val_loss.
        assert 0 <= t["val_accuracy"] <= 1 and t["val_loss"] is not None
        assert round(t["val_accuracy"] * val_rows, 6) == int(round(t["val_accuracy"] * val_rows))
    best = max(trials, key=lambda t: t["val_accuracy"])
    assert section["best"]["trial"] == best["trial"]
    assert trials[1]["val_accuracy"] > trials[0]["val_accuracy"], trials
    # Tune itself was told mode max: its own best result is the same trial.
    results = tune.Tuner.restore(str(tmp_path / "sweep" / "tune"), run_trial).get_results()
    for result in results:  # every epoch's report carries val_accuracy
        assert result.metrics_dataframe["val_accuracy"].notna().sum() == 3
    tune_best = results.get_best_result()
    assert tune_best.metrics["val_accuracy"] == best["val_accuracy"]
    assert tune_best.metrics["checkpoint_path"] == best["checkpoint"]
    md = render_markdown({"sweep": section})
    assert "Best by val_accuracy on the validation rows (higher is better)" in md
    assert "val_accuracy" in (tmp_path / "sweep" / "trials.md").read_text().splitlines()[0]
