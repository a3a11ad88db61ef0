"""The sweep's plain parts: search settings, one-at-a-time points, Tune's param space, the
trials tables, the dataset-size curve fit and the plots."""

from __future__ import annotations

import csv

import pytest

from ray_pipeline.config import ConfigError, SweepSection, TrainSection, load_config
from ray_pipeline.sweep.analysis import (
    ablation_points,
    fit_size_curve,
    one_at_a_time_points,
    saturating_power_law,
    write_tables,
)
from ray_pipeline.sweep.stage import check_sweep, param_space, trial_base, trial_params

TRAIN = TrainSection(learning_rate=1e-3, batch_size=16, epochs=2, lora={"r": 8, "alpha": 16})


def test_one_at_a_time_varies_each_parameter_around_the_train_values():
    sweep = SweepSection(search="one_at_a_time", learning_rate=[1e-3, 3e-3, 1e-2], lora_r=[4, 16])
    points = one_at_a_time_points(sweep, TRAIN)
    assert points == [
        {"learning_rate": 1e-3, "lora_r": 8, "varied": "baseline"},
        {"learning_rate": 3e-3, "lora_r": 8, "varied": "learning_rate"},
        {"learning_rate": 1e-2, "lora_r": 8, "varied": "learning_rate"},
        {"learning_rate": 1e-3, "lora_r": 4, "varied": "lora_r"},
        {"learning_rate": 1e-3, "lora_r": 16, "varied": "lora_r"},
    ]  # 1e-3 is the baseline's: not run twice


def test_param_space_of_each_search():
    from ray import tune

    oat = param_space(SweepSection(search="one_at_a_time", epochs=[1, 3]), TRAIN)
    assert oat["point"] == tune.grid_search(
        [
            {"epochs": 2, "varied": "baseline"},
            {"epochs": 1, "varied": "epochs"},
            {"epochs": 3, "varied": "epochs"},
        ]
    )
    assert oat["fraction"] == tune.grid_search([1.0])
    rnd = param_space(
        SweepSection(
            search="random",
            batch_size=[8, 16],
            ranges={
                "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                "epochs": {"low": 1, "high": 3},
            },
            fractions=[0.25, 1.0],
        ),
        TRAIN,
    )
    assert rnd["batch_size"].categories == [8, 16]
    assert (rnd["learning_rate"].lower, rnd["learning_rate"].upper) == (1e-4, 1e-2)
    assert type(rnd["learning_rate"].sampler).__name__ == "_LogUniform"
    assert (rnd["epochs"].lower, rnd["epochs"].upper) == (1, 4)  # randint's end is exclusive
    assert rnd["fraction"] == tune.grid_search([0.25, 1.0])
    assert trial_params({"point": {"epochs": 1, "varied": "epochs"}, "fraction": 0.5}) == {
        "epochs": 1,
        "varied": "epochs",
        "fraction": 0.5,
    }


def test_sweep_settings_are_checked_with_their_paths():
    base = {
        "task": {"prompt": {"template": "{input}"}, "labels": ["0", "1"]},
        "teacher": {},
        "data": {"logs": [{"path": "x.jsonl"}]},
    }
    with pytest.raises(ConfigError) as e:
        load_config(
            data={
                **base,
                "sweep": {
                    "learning_rate": [1e-3],
                    "ranges": {
                        "learning_rate": {"low": 1, "high": 2},
                        "dropout": {"low": 0.1, "high": 0.2},
                    },
                },
            }
        )
    assert "sweep.ranges: unknown parameter(s) ['dropout']" in str(e.value)
    with pytest.raises(ConfigError, match="sweep: ranges need search: random"):
        load_config(data={**base, "sweep": {"ranges": {"epochs": {"low": 1, "high": 2}}}})
    with pytest.raises(ConfigError, match=r"sweep.ranges.epochs: low \(3.0\) must be below"):
        load_config(
            data={
                **base,
                "sweep": {"search": "random", "ranges": {"epochs": {"low": 3, "high": 2}}},
            }
        )
    with pytest.raises(ConfigError, match="one_at_a_time needs at least one parameter list"):
        load_config(data={**base, "sweep": {"search": "one_at_a_time"}})
    with pytest.raises(ConfigError, match="sweep.fractions: fractions must be non-empty, distinct"):
        load_config(data={**base, "sweep": {"fractions": [0.5, 0.5]}})
    with pytest.raises(ValueError, match="checkpoint_every_steps carry no validation loss"):
        check_sweep(SweepSection(scheduler="asha"), TrainSection(checkpoint_every_steps=5))
    t = trial_base(SweepSection(num_workers=3, cpus_per_worker=0.5), TRAIN)
    assert (t.num_workers, t.cpus_per_worker, t.gpus_per_worker) == (3, 0.5, 1.0)


def test_size_curve_fit_recovers_a_saturating_power_law():
    rows = [100, 200, 400, 800]
    values = [saturating_power_law(n, 5.0, 0.5, 0.3) for n in rows]
    fit = fit_size_curve(rows, values)
    assert fit["fitted"] and fit["form"] == "a * n^-b + c"
    assert fit["b"] == pytest.approx(0.5, rel=1e-3) and fit["c"] == pytest.approx(0.3, rel=1e-3)
    assert fit["at_double_rows"] == pytest.approx(
        saturating_power_law(1600, 5.0, 0.5, 0.3), rel=1e-4
    )
    # Doubling 800 rows: 5 * (800^-0.5 - 1600^-0.5) = 0.0518 less loss.
    assert fit["gain_from_doubling"] == pytest.approx(0.05178, abs=1e-4)
    two = fit_size_curve([100, 400], [1.0, 0.5])  # pure power law through both points
    assert two["b"] == pytest.approx(0.5) and two["at_double_rows"] == pytest.approx(0.5 / 2**0.5)
    assert fit_size_curve([100], [1.0]) == {
        "fitted": False,
        "why": "needs at least two dataset sizes",
    }


def test_tables_ablation_points_and_plots(tmp_path):
    from ray_pipeline.sweep.plots import plot_fraction_ablation, plot_parameter

    trials = [
        {"trial": f"t{i}", "config": {"learning_rate": lr, "fraction": f}, "train_rows": rows,
         "epochs_run": 2, "stopped_early": False, "train_loss": 1.0, "val_loss": v, "checkpoint": f"/c{i}"}
        for i, (lr, f, rows, v) in enumerate(
            [(1e-3, 0.5, 50, 0.9), (3e-3, 0.5, 50, 0.8), (1e-3, 1.0, 100, 0.7), (3e-3, 1.0, 100, 0.75)]
        )
    ]  # fmt: skip
    csv_path, md_path = write_tables(
        trials, ["learning_rate", "fraction"], tmp_path / "t.csv", tmp_path / "t.md"
    )
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["trial"] for r in rows] == ["t0", "t1", "t2", "t3"]
    assert (
        rows[1]["learning_rate"] == "0.003"
        and rows[1]["val_loss"] == "0.8"
        and rows[1]["checkpoint"] == "/c1"
    )
    md = md_path.read_text().splitlines()
    assert (
        md[0]
        == "| trial | learning_rate | fraction | train_rows | epochs_run | stopped_early | train_loss | val_loss |"
    )
    assert md[3] == "| t1 | 0.003 | 0.5 | 50 | 2 | False | 1 | 0.8 |" and len(md) == 6
    points = ablation_points(trials, "val_loss")
    assert points == [(0.5, 50, 0.8), (1.0, 100, 0.7)]  # each size at its best setting
    for png in (
        plot_fraction_ablation(points, fit_size_curve([50, 100], [0.8, 0.7]), tmp_path / "a.png"),
        plot_parameter(trials, "learning_rate", tmp_path / "lr.png"),
    ):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trial_count_of_each_search():
    from ray_pipeline.sweep.stage import trial_count

    grid = SweepSection(learning_rate=[1e-3, 3e-3], lora_r=[4, 8], fractions=[0.5, 1.0])
    assert trial_count(grid, TRAIN) == 8
    oat = SweepSection(search="one_at_a_time", learning_rate=[1e-3, 3e-3], num_samples=2)
    assert trial_count(oat, TRAIN) == 2 * 2  # baseline (1e-3) and 3e-3, twice
    rnd = SweepSection(search="random", batch_size=[8, 16], num_samples=3, fractions=[0.5, 1.0])
    assert trial_count(rnd, TRAIN) == 6


def test_the_sweep_metric_must_be_computable_on_validation_rows():
    base = {
        "task": {"prompt": {"template": "{input}"}, "labels": ["0", "1"]},
        "teacher": {"simulator": {"enabled": True}},
        "data": {"logs": [{"path": "x.jsonl"}]},
    }
    classifier = {"student": {"kind": "classifier"}}
    cfg = load_config(data={**base, "train": classifier, "sweep": {"metric": "val_accuracy"}})
    assert (cfg.sweep.metric, cfg.sweep.mode) == ("val_accuracy", "max")
    assert SweepSection().mode == "min"  # val_loss
    with pytest.raises(ConfigError, match="sweep.metric 'val_accuracy' needs train.student.kind"):
        load_config(data={**base, "sweep": {"metric": "val_accuracy"}})  # causal_lm student
    generative = {"prompt": {"template": "{input}"}, "kind": "generative"}
    with pytest.raises(ConfigError, match="task.kind is generative"):
        load_config(data={**base, "task": generative, "sweep": {"metric": "val_accuracy"}})
    with pytest.raises(ConfigError, match=r"sweep.metric 'val_loss' .* train.val_fraction is 0"):
        load_config(data={**base, "train": {"val_fraction": 0.0}, "sweep": {}})
    with pytest.raises(ConfigError, match="sweep.metric: Input should be 'val_loss' or"):
        load_config(data={**base, "sweep": {"metric": "test_accuracy"}})


def test_accuracy_is_best_high_in_the_choice_the_ablation_and_the_plots(tmp_path):
    from ray_pipeline.report import render_markdown
    from ray_pipeline.sweep.analysis import fitted_value, pick_best
    from ray_pipeline.sweep.plots import plot_fraction_ablation, plot_parameter

    trials = [
        {"trial": f"t{i}", "config": {"learning_rate": lr, "fraction": f}, "train_rows": rows,
         "val_loss": 0.5, "val_accuracy": acc, "checkpoint": f"/c{i}"}
        for i, (lr, f, rows, acc) in enumerate(
            [(1e-3, 0.5, 50, 0.70), (3e-3, 0.5, 50, 0.80), (1e-3, 1.0, 100, 0.90), (3e-3, 1.0, 100, 0.85)]
        )
    ]  # fmt: skip
    assert pick_best(trials, "val_accuracy", "max")["trial"] == "t2"
    assert pick_best(trials, "val_accuracy", "min")["trial"] == "t0"
    points = ablation_points(trials, "val_accuracy", "max")
    assert points == [(0.5, 50, 0.80), (1.0, 100, 0.90)]  # each size at its best (highest)
    # The law is fitted to the error rate 1 - accuracy: 0.2 at 50 rows, 0.1 at 100, so b = 1
    # and doubling to 200 rows leaves 0.05 error: accuracy 0.95, a gain of +0.05.
    fit = fit_size_curve([50, 100], [0.80, 0.90], "max")
    assert fit["form"] == "1 - (a * n^-b (two sizes: no plateau fitted))"
    assert fit["b"] == pytest.approx(1.0)
    assert fit["at_rows"] == pytest.approx(0.90) and fit["at_double_rows"] == pytest.approx(0.95)
    assert fit["gain_from_doubling"] == pytest.approx(0.05)
    assert fitted_value(fit, 50) == pytest.approx(0.80)
    rows = [100, 200, 400, 800]
    three = fit_size_curve(rows, [1 - saturating_power_law(n, 5.0, 0.5, 0.05) for n in rows], "max")
    assert three["c"] == pytest.approx(0.05, rel=1e-3)  # the accuracy levels off at 0.95
    assert three["gain_from_doubling"] == pytest.approx(0.05178, abs=1e-4)
    csv_path, md_path = write_tables(
        trials, ["learning_rate"], tmp_path / "t.csv", tmp_path / "t.md"
    )
    assert md_path.read_text().splitlines()[0].endswith("| val_loss | val_accuracy |")
    for png in (
        plot_fraction_ablation(points, fit, tmp_path / "a.png", "val_accuracy", "max"),
        plot_parameter(trials, "learning_rate", tmp_path / "lr.png", "val_accuracy", "max"),
    ):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = render_markdown(
        {
            "sweep": {
                "metric": "val_accuracy",
                "mode": "max",
                "trials": trials,
                "best": trials[2],
                "ablation": {"fit": fit},
            }
        }
    )
    assert "Best by val_accuracy on the validation rows (higher is better)" in md
    assert "val_accuracy = 1 - (10 * n^-1.000 + 0) over training rows n" in md  # 10/n
    assert "from 0.9000 to 0.9500 (a gain of 0.0500)" in md


def test_correct_classes_counts_argmax_hits():
    import torch

    from ray_pipeline.train.loop import correct_classes

    logits = torch.tensor([[2.0, 1.0, 0.0], [0.1, 0.3, 0.2], [0.0, 0.0, 5.0], [1.0, 2.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])  # argmax: 0, 1, 2, 1 -> rows 0 and 1 are right
    assert int(correct_classes(logits, labels)) == 2
    assert int(correct_classes(logits[:0], labels[:0])) == 0
