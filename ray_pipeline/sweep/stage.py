"""Sweep stage: a Ray Tune search over training hyperparameters x dataset-size fractions.

Every trial is one TorchTrainer built by the train stage's own ``make_trainer`` (same data
preparation, same worker loop), on a nested subset of the training rows (``data.in_subset``:
by a seeded hash of the row id, so the 50% subset lies inside the 100% one and a size
ablation compares like with like). All trials are scored on the same validation rows, and the
best is chosen on them (never on a test set). The datasets of each fraction are made once by
the driver and shared by the trials.

Searches (``sweep.search``): grid, random (lists are choices, ``ranges`` continuous) and
one-parameter-at-a-time around the train section's values; ASHA stops the worse trials early
(one Tune iteration per epoch). An interrupted sweep (Ctrl-C, a crash) resumes with
``Tuner.restore`` on the next ``distill sweep``: finished trials are kept, not run again.
Trials are logged to TensorBoard (tune/<trial>/events.*) and MLflow (a local file store).

Outputs under runs/<id>/sweep/: tokenizer/ and student_base/ (shared by the trials), tune/
(Ray Tune's run folder), trials/<trial>/checkpoint_*/ (each trial's student), mlruns/,
trials.csv and trials.md (every trial), param_<name>.png (the metric by each parameter) and
ablation.png (the metric by training rows, with the fitted curve).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ray_pipeline import storage
from ray_pipeline.config import INT_SWEEP_PARAMS, SweepSection, TrainSection
from ray_pipeline.run_state import Run
from ray_pipeline.sweep.analysis import (
    ablation_points,
    fit_size_curve,
    grid_points,
    one_at_a_time_points,
    pick_best,
    trial_train_section,
    write_tables,
)

log = logging.getLogger("distill.sweep")

# A trial only starts a TorchTrainer, whose workers hold the CPUs/GPUs: the trial itself must
# not take a CPU, or trials and their own workers deadlock on small machines. Ray needs a
# non-empty bundle, hence the 1 byte of memory.
TRIAL_RESOURCES = {"cpu": 0, "memory": 1}
STATE_FILE = "distill_sweep.json"  # which sweep tune/ belongs to, and whether it finished


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial finished (Ctrl-C, SIGTERM); the next
    `distill sweep` with the same settings resumes it."""


def check_sweep(sweep: SweepSection, train: TrainSection) -> None:
    """Errors that would otherwise surface in every trial (the metric's own checks are the
    config's: ``DistillConfig._sweep_metric_is_computable``)."""
    if train.method != "lora" and ("lora_r" in sweep.swept or "lora_alpha" in sweep.swept):
        raise ValueError(
            f"sweep.lora_r / sweep.lora_alpha need train.method 'lora', got {train.method!r}"
        )
    if sweep.scheduler == "asha" and train.checkpoint_every_steps:
        raise ValueError(
            "sweep.scheduler 'asha' compares trials at every report, and the reports of "
            "train.checkpoint_every_steps carry no validation loss: set it to null for the sweep"
        )


def trial_base(sweep: SweepSection, train: TrainSection) -> TrainSection:
    """The train section every trial starts from: with the sweep's workers and resources."""
    data = train.model_dump(mode="json")
    data["num_workers"] = sweep.num_workers
    if sweep.cpus_per_worker is not None:
        data["cpus_per_worker"] = sweep.cpus_per_worker
    if sweep.gpus_per_worker is not None:
        data["gpus_per_worker"] = sweep.gpus_per_worker
    return TrainSection.model_validate(data)


def param_space(sweep: SweepSection, train: TrainSection) -> dict[str, Any]:
    """Tune's param_space for the configured search; the fractions are always a grid axis."""
    from ray import tune

    space: dict[str, Any] = {}
    if sweep.search == "one_at_a_time":
        space["point"] = tune.grid_search(one_at_a_time_points(sweep, train))
    elif sweep.search == "grid":
        space["point"] = tune.grid_search(grid_points(sweep))
    else:
        for name in sweep.swept:
            values = getattr(sweep, name)
            if values is not None:
                space[name] = tune.choice(values)
                continue
            r = sweep.ranges[name]
            if name in INT_SWEEP_PARAMS:
                lo, hi = int(r.low), int(r.high) + 1  # randint's upper end is exclusive
                space[name] = tune.lograndint(lo, hi) if r.log else tune.randint(lo, hi)
            else:
                space[name] = (
                    tune.loguniform(r.low, r.high) if r.log else tune.uniform(r.low, r.high)
                )
    space["fraction"] = tune.grid_search(list(sweep.fractions))
    return space


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's values (grid / one-at-a-time points are one 'point' value in Tune)."""
    params = {k: v for k, v in config.items() if k != "point"}
    return {**config.get("point", {}), **params}


def run_trial(
    config: dict[str, Any],
    *,
    prepared: Any,
    datasets: dict[float, dict[str, Any]],
    train: dict[str, Any],
    storage_path: str,
    seed: int,
) -> None:
    """One Tune trial: train on the trial's subset with its hyperparameters. Runs in a Tune
    actor; TuneReportCallback forwards every worker report (with the checkpoint path)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_pipeline.train.stage import make_trainer

    params = trial_params(config)
    trial_train = trial_train_section(TrainSection.model_validate(train), params)
    fraction = params["fraction"]
    trainer = make_trainer(
        prepared,
        trial_train,
        datasets[fraction],
        prepared.train_rows(fraction, seed),
        num_workers=trial_train.num_workers,
        storage_path=storage_path,
        name=ray.tune.get_context().get_trial_name(),
        seed=seed,
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def sweep_key(run: Run, dataset_sha: str | None) -> str:
    """What a resumed sweep must share with the interrupted one: settings, seed and data."""
    key = {
        "sweep": run.cfg.sweep.model_dump(mode="json"),
        "train": run.cfg.train.model_dump(mode="json"),
        "seed": run.cfg.run.seed,
        "dataset": dataset_sha,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _state(out: Path) -> dict[str, Any] | None:
    path = out / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _write_state(out: Path, key: str, finished: bool) -> None:
    (out / STATE_FILE).write_text(json.dumps({"key": key, "finished": finished}))


def logging_callbacks(run: Run, out: Path) -> list[Any]:
    """TensorBoard (tensorboardX event files in each trial's folder) and MLflow (by default a
    local file store in the sweep folder) through Ray Tune's logger callbacks."""
    from ray.tune.logger import TBXLoggerCallback

    callbacks: list[Any] = [TBXLoggerCallback()]
    sweep = run.cfg.sweep
    if sweep.mlflow:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = sweep.mlflow_tracking_uri or (out / "mlruns").absolute().as_uri()
        if uri.startswith("file:"):
            # MLflow 3.x keeps its file store only on request; it needs no database server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=uri,
                experiment_name=f"{run.cfg.run.name}-sweep",
                tags={"run_id": run.run_id},
            )
        )
    return callbacks


def trial_count(sweep: SweepSection, train: TrainSection) -> int:
    """How many trials the sweep runs: its points (one for a random search) x fractions x
    num_samples."""
    points = {
        "grid": lambda: len(grid_points(sweep)),
        "one_at_a_time": lambda: len(one_at_a_time_points(sweep, train)),
        "random": lambda: 1,
    }[sweep.search]()
    return points * len(sweep.fractions) * sweep.num_samples


def finished_trials(tune_dir: Path) -> int:
    """Trials of the Tune run that finished, as its saved state has them. After Ctrl-C, Tune
    saves the state before it stops the running trials (which the ResultGrid then shows as
    terminated), and trials not yet started are not in it at all: the saved state is what a
    restore resumes."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(tune_dir)).trials
    return sum(t.status in ("TERMINATED", "ERROR") for t in trials)


def _tune_config(sweep: SweepSection, train: TrainSection, seed: int) -> Any:
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from ray_pipeline.sweep.scheduler import TIME_ATTR, ResumableASHA

    scheduler = None
    if sweep.scheduler == "asha":
        # ASHA's rungs reach up to the longest trial, in finished epochs. Tuner.restore keeps
        # this scheduler (tuner.pkl) and ResumableASHA refills its rungs from the results.
        max_epochs = int(
            max(sweep.epochs)
            if sweep.epochs
            else sweep.ranges["epochs"].high
            if "epochs" in sweep.ranges
            else train.epochs
        )
        scheduler = ResumableASHA(
            time_attr=TIME_ATTR,
            grace_period=sweep.asha.grace_period,
            reduction_factor=sweep.asha.reduction_factor,
            max_t=max_epochs,
        )
    return tune.TuneConfig(
        metric=sweep.metric,
        mode=sweep.mode,
        scheduler=scheduler,
        num_samples=sweep.num_samples,
        # Seeded draws: a random search is the same search in every run of one seed. (Tune
        # ignores TuneConfig.max_concurrent_trials beside a search generator: it goes here.)
        search_alg=BasicVariantGenerator(
            random_state=seed, max_concurrent=sweep.max_concurrent_trials
        ),
    )


def collect_trials(grid: Any, base: TrainSection, storage_path: str) -> list[dict[str, Any]]:
    """One plain record per Tune result (its values, final report and checkpoint: a URI when
    the trials' `storage_path` is one)."""
    trials = []
    for result in grid:
        m = result.metrics or {}
        params = trial_params(result.config)
        epochs = trial_train_section(base, params).epochs
        trials.append(
            {
                "trial": m.get("trial_id") or Path(result.path).name,
                "config": params,
                "val_loss": m.get("val_loss"),
                "val_accuracy": m.get("val_accuracy"),
                "train_loss": m.get("train_loss"),
                "train_rows": m.get("train_rows"),
                "epochs_run": m.get("epochs"),
                "stopped_early": m.get("epochs") is not None and m["epochs"] < epochs,
                "checkpoint": storage.as_uri_like(m.get("checkpoint_path"), storage_path),
            }
        )
    trials.sort(key=lambda t: t["trial"])
    return trials


def run_sweep(run: Run, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """The sweep stage; `callbacks`: more Ray Tune callbacks (e.g. a test's interruption)."""
    from ray import tune

    from ray_pipeline.sweep.plots import plot_fraction_ablation, plot_parameter
    from ray_pipeline.train.stage import data_loading_mode, make_datasets, prepare, set_threshold

    started = time.perf_counter()
    sweep, train = run.cfg.sweep, run.cfg.train
    if sweep is None:
        raise ValueError("the config has no 'sweep' section: add one to run `distill sweep`")
    check_sweep(sweep, train)
    out = run.stage_dir("sweep")
    base = trial_base(sweep, train)
    prepared = prepare(run, out)
    seed = run.cfg.run.seed
    key = sweep_key(run, prepared.lineage["dataset_content_sha256"])
    state = _state(out)
    resuming = (
        sweep.resume
        and state is not None
        and state["key"] == key
        and not state["finished"]
        and tune.Tuner.can_restore(run.shared(out / "tune"))
    )
    if not resuming:
        for old in ("tune", "trials", "mlruns", "best"):
            shutil.rmtree(out / old, ignore_errors=True)  # a new sweep replaces, never mixes
            if run.uri is not None:
                storage.remove_dir(run.shared(out / old))
        _write_state(out, key, finished=False)
        run.push()  # the sweep's state beside its trials: resumable from another machine
    workers_cpus = sweep.max_concurrent_trials * sweep.num_workers * base.cpus_per_worker
    mode = data_loading_mode(train, prepared.dataset_bytes, workers_cpus)
    datasets = {
        fraction: make_datasets(prepared, train, fraction=fraction, seed=seed, mode=mode)
        for fraction in sweep.fractions
    }
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            prepared=prepared,
            datasets=datasets,
            train=base.model_dump(mode="json"),
            storage_path=run.shared(out / "trials"),
            seed=seed,
        ),
        TRIAL_RESOURCES,
    )
    if resuming:
        log.info("sweep: resuming the interrupted sweep in %s (finished trials are kept)", out)
        tuner = tune.Tuner.restore(
            run.shared(out / "tune"), trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        log.info(
            "sweep: %s search over %s x fractions %s, %d worker(s) of %g CPU per trial",
            sweep.search,
            sweep.swept or "(train settings)",
            sweep.fractions,
            sweep.num_workers,
            base.cpus_per_worker,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep, train),
            tune_config=_tune_config(sweep, base, seed),
            run_config=tune.RunConfig(
                # Tune and the trials' Ray Train runs write to the run's URI when it has one:
                # trials run on any node.
                storage_path=run.shared(out),
                name="tune",
                verbose=1,
                callbacks=[*logging_callbacks(run, out), *(callbacks or [])],
            ),
        )
    grid = tuner.fit()
    finished, total = finished_trials(run.shared(out / "tune")), trial_count(sweep, train)
    if finished < total:
        raise SweepInterrupted(
            f"the sweep stopped with {finished} of {total} trials finished; "
            f"run `distill sweep CONFIG --run-id {run.run_id}` to resume it (finished trials "
            "are kept)"
        )
    if grid.errors:
        raise RuntimeError(
            f"{len(grid.errors)} of {len(grid)} sweep trials failed; first error:\n{grid.errors[0]}"
        )
    _write_state(out, key, finished=True)
    trials = collect_trials(grid, base, run.shared(out / "trials"))
    keys = [*sweep.swept, "fraction"] + (["varied"] if sweep.search == "one_at_a_time" else [])
    best = dict(pick_best(trials, sweep.metric, sweep.mode))  # its own record, not the trial's
    if storage.is_uri(best["checkpoint"]):
        # The threshold is stored in the checkpoint: the best one is copied into the run
        # folder (uploaded with it), where evaluation and serving find it like train's.
        best["checkpoint_uri"] = best["checkpoint"]
        best["checkpoint"] = str(out / "best")
        shutil.rmtree(out / "best", ignore_errors=True)
        storage.copy_dir(best["checkpoint_uri"], best["checkpoint"])
    best["threshold"] = set_threshold(best["checkpoint"], prepared.val_examples, run.cfg)
    points = ablation_points(trials, sweep.metric, sweep.mode)
    fit = fit_size_curve([p[1] for p in points], [p[2] for p in points], sweep.mode)
    csv_path, md_path = write_tables(trials, keys, out / "trials.csv", out / "trials.md")
    section = {
        "search": sweep.search,
        "scheduler": sweep.scheduler,
        "resumed": resuming,
        "keys": keys,
        "trials": trials,
        "best": best,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "table": str(csv_path),
        "table_md": str(md_path),
        "ablation": {
            "points": [{"fraction": f, "train_rows": n, sweep.metric: v} for f, n, v in points],
            "fit": fit,
        },
        "plot": str(
            plot_fraction_ablation(points, fit, out / "ablation.png", sweep.metric, sweep.mode)
        ),
        "param_plots": {
            p: str(plot_parameter(trials, p, out / f"param_{p}.png", sweep.metric, sweep.mode))
            for p in sweep.swept
        },
        "mlflow": (sweep.mlflow_tracking_uri or (out / "mlruns").absolute().as_uri())
        if sweep.mlflow
        else None,
        "tensorboard": run.shared(out / "tune"),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info(
        "sweep: best %s with %s %.4f (%s is better); checkpoint %s",
        best["config"],
        sweep.metric,
        best[sweep.metric],
        "higher" if sweep.mode == "max" else "lower",
        best["checkpoint"],
    )
    return section
