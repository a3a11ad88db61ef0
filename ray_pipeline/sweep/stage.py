"""Sweep stage: a Ray Tune grid over training hyperparameters x dataset-size fractions.

Every trial is one TorchTrainer built by the train stage's own ``make_trainer`` (same data
preparation, same worker loop), on a nested subset of the training rows (``data.in_subset``:
by a seeded hash of the row id, so the 50% subset lies inside the 100% one and a size
ablation compares like with like). All trials are scored on the same validation rows. The
datasets of each fraction are made once by the driver and shared by the trials.

Outputs under runs/<id>/sweep/: tokenizer/ and student_base/ (shared by the trials), tune/
(Ray Tune's run folder), trials/<trial>/checkpoint/ (each trial's student),
trials.csv and ablation.png.
"""

from __future__ import annotations

import csv
import itertools
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from ray_pipeline.config import SweepSection, TrainSection
from ray_pipeline.run_state import Run

log = logging.getLogger("distill.sweep")

# Sweep parameter -> path of the train field it replaces.
PARAMS: dict[str, tuple[str, ...]] = {
    "learning_rate": ("learning_rate",),
    "batch_size": ("batch_size",),
    "epochs": ("epochs",),
    "lora_r": ("lora", "r"),
    "lora_alpha": ("lora", "alpha"),
}
# A trial only starts a TorchTrainer, whose workers hold the CPUs/GPUs: the trial itself must
# not take a CPU, or trials and their own workers deadlock on small machines. Ray needs a
# non-empty bundle, hence the 1 byte of memory.
TRIAL_RESOURCES = {"cpu": 0, "memory": 1}


def swept_values(sweep: SweepSection) -> dict[str, list[Any]]:
    """The grid's axes: the configured lists (None keeps the train value) and the fractions."""
    axes = {name: getattr(sweep, name) for name in PARAMS if getattr(sweep, name) is not None}
    return {**axes, "fraction": list(sweep.fractions)}


def grid_points(sweep: SweepSection) -> list[dict[str, Any]]:
    """Every combination of the axes (what Tune's grid_search expands to), in a stable order."""
    axes = swept_values(sweep)
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def trial_train_section(base: TrainSection, params: dict[str, Any]) -> TrainSection:
    """`base` with the trial's swept values put in (validated like any train section)."""
    data = base.model_dump(mode="json")
    for name, value in params.items():
        if name == "fraction":
            continue
        *parents, leaf = PARAMS[name]
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = value
    return TrainSection.model_validate(data)


def check_sweep(sweep: SweepSection, train: TrainSection) -> None:
    """Errors that would otherwise surface in every trial."""
    if train.method != "lora" and (sweep.lora_r or sweep.lora_alpha):
        raise ValueError(
            f"sweep.lora_r / sweep.lora_alpha need train.method 'lora', got {train.method!r}"
        )
    if sweep.metric == "val_loss" and train.val_fraction == 0:
        raise ValueError(
            "sweep.metric 'val_loss' needs validation rows: set train.val_fraction > 0"
        )


def pick_best(trials: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    scored = [t for t in trials if t.get(metric) is not None]
    if not scored:
        raise RuntimeError(f"no sweep trial reported {metric}")
    return min(scored, key=lambda t: t[metric])


def write_table(trials: list[dict[str, Any]], path: Path) -> Path:
    keys = list(trials[0]["config"])
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*keys, "train_rows", "train_loss", "val_loss", "checkpoint"])
        for t in trials:
            w.writerow(
                [
                    *(t["config"][k] for k in keys),
                    t["train_rows"],
                    t["train_loss"],
                    t["val_loss"],
                    t["checkpoint"],
                ]
            )
    return path


def run_trial(
    config: dict[str, Any],
    *,
    prepared: Any,
    datasets: dict[float, dict[str, Any]],
    train: dict[str, Any],
    num_workers: int,
    storage_path: str,
    seed: int,
) -> None:
    """One Tune trial: train on the trial's subset with its hyperparameters. Runs in a Tune
    actor; TuneReportCallback forwards every worker report (with the checkpoint path)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_pipeline.train.stage import make_trainer

    params = dict(config)
    trial_train = trial_train_section(TrainSection.model_validate(train), params)
    fraction = params["fraction"]
    trainer = make_trainer(
        prepared,
        trial_train,
        datasets[fraction],
        prepared.train_rows(fraction, seed),
        num_workers=num_workers,
        storage_path=storage_path,
        name=ray.tune.get_context().get_trial_name(),
        seed=seed,
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def run_sweep(run: Run) -> dict[str, Any]:
    from ray import tune

    from ray_pipeline.sweep.plots import plot_fraction_ablation
    from ray_pipeline.train.stage import data_loading_mode, make_datasets, prepare, set_threshold

    started = time.perf_counter()
    sweep, train = run.cfg.sweep, run.cfg.train
    if sweep is None:
        raise ValueError("the config has no 'sweep' section: add one to run `distill sweep`")
    check_sweep(sweep, train)
    out = run.stage_dir("sweep")
    for old in ("tune", "trials"):
        shutil.rmtree(out / old, ignore_errors=True)  # a re-run replaces, never mixes, results
    prepared = prepare(run, out)
    seed = run.cfg.run.seed
    workers_cpus = sweep.max_concurrent_trials * sweep.num_workers * train.cpus_per_worker
    mode = data_loading_mode(train, prepared.dataset_bytes, workers_cpus)
    datasets = {
        fraction: make_datasets(prepared, train, fraction=fraction, seed=seed, mode=mode)
        for fraction in sweep.fractions
    }
    points = grid_points(sweep)
    log.info("sweep: %d trials over %s", len(points), swept_values(sweep))
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            prepared=prepared,
            datasets=datasets,
            train=train.model_dump(mode="json"),
            num_workers=sweep.num_workers,
            storage_path=str(out / "trials"),
            seed=run.cfg.run.seed,
        ),
        TRIAL_RESOURCES,
    )
    tuner = tune.Tuner(
        trainable,
        param_space={
            name: tune.grid_search(values) for name, values in swept_values(sweep).items()
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent_trials),
        run_config=tune.RunConfig(storage_path=str(out), name="tune", verbose=1),
    )
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(
            f"{len(grid.errors)} of {len(grid)} sweep trials failed; first error:\n{grid.errors[0]}"
        )
    trials = []
    for result in grid:
        m = result.metrics
        trials.append(
            {
                "config": {k: result.config[k] for k in swept_values(sweep)},
                "val_loss": m.get("val_loss"),
                "train_loss": m.get("train_loss"),
                "train_rows": m.get("train_rows"),
                "checkpoint": m.get("checkpoint_path"),
            }
        )
    trials.sort(key=lambda t: [t["config"][k] for k in t["config"]])
    best = pick_best(trials, sweep.metric)
    best["threshold"] = set_threshold(best["checkpoint"], prepared.val_examples, run.cfg)
    section = {
        "trials": trials,
        "best": best,
        "metric": sweep.metric,
        "table": str(write_table(trials, out / "trials.csv")),
        "plot": str(plot_fraction_ablation(trials, out / "ablation.png", sweep.metric)),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info(
        "sweep: best %s with %s %.4f; checkpoint %s",
        best["config"],
        sweep.metric,
        best[sweep.metric],
        best["checkpoint"],
    )
    return section
