"""ASHA across Tuner.restore, on a local Ray with trials that report fixed validation losses
(no model: what is tested is the scheduler's decisions, which only see the reports).

Ray Tune does not save a scheduler's state with the experiment; Tuner.restore runs with the
scheduler as it was when the sweep started. The sweep's ResumableASHA refills its rungs from
the finished trials' recorded results, so a restored sweep stops the same trials as an
uninterrupted one; a plain ASHAScheduler does not."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from ray import tune

from ray_pipeline.config import SweepSection, TrainSection

pytestmark = pytest.mark.integration

# One list of per-epoch validation losses per trial, run one at a time in this order. With
# grace 1, reduction 2 and 4 epochs the rungs sit at epochs 1, 2 and 4. Trial 0 finishes
# (0.5 at epoch 1); trial 1 is worse at epoch 1 (0.9 below the rung's median, 0.5) and stops
# there; trial 2 (0.6) is above the median of 0.5 and 0.9 and goes on.
LOSSES = [[0.5, 0.4, 0.3, 0.2], [0.9, 0.8, 0.7, 0.6], [0.6, 0.35, 0.3, 0.25]]
SWEEP = SweepSection(
    scheduler="asha", asha={"grace_period": 1, "reduction_factor": 2}, max_concurrent_trials=1
)
TRAIN = TrainSection(epochs=4)


def report_losses(config):
    for epoch, loss in enumerate(config["losses"], start=1):
        time.sleep(0.2)  # a trial's first report comes after the interruption is handled
        tune.report({"epochs": epoch, "val_loss": loss})


class Interrupt(tune.Callback):
    """Ctrl-C once, when the first trial has finished (the marker file keeps the restored
    run from being interrupted again)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not self.marker.exists():
            self.marker.write_text("interrupted")
            os.kill(os.getpid(), signal.SIGINT)


def epochs_run(tune_dir: Path) -> list[int]:
    """Epochs each trial reported, in trial order, from the results Tune recorded."""
    from ray.tune import ExperimentAnalysis

    trials = sorted(ExperimentAnalysis(str(tune_dir)).trials, key=lambda t: t.trial_id)
    return [len((Path(t.path) / "result.json").read_text().splitlines()) for t in trials]


def sweep(tmp_path: Path, name: str, scheduler=None, interrupt: bool = False) -> Path:
    """Run the trials of LOSSES (interrupted after the first, then restored, if asked) with
    the sweep stage's TuneConfig, or with `scheduler` in its place."""
    from ray_pipeline.sweep.stage import _tune_config

    tune_config = _tune_config(SWEEP, TRAIN, seed=0)
    if scheduler is not None:
        tune_config.scheduler = scheduler
    tune_config.reuse_actors = True  # one trial actor for all: starting one takes seconds
    callbacks = [Interrupt(tmp_path / f"{name}.interrupted")] if interrupt else []
    tuner = tune.Tuner(
        report_losses,
        param_space={"losses": tune.grid_search(LOSSES)},
        tune_config=tune_config,
        run_config=tune.RunConfig(storage_path=str(tmp_path), name=name, callbacks=callbacks),
    )
    tuner.fit()
    path = tmp_path / name
    if interrupt:
        assert epochs_run(path)[0] == 4  # the first trial finished before the interruption
        restored = tune.Tuner.restore(str(path), report_losses, resume_unfinished=True)
        restored.fit()
    return path


def test_asha_decides_after_a_restore_as_without_the_interruption(ray_local, tmp_path):
    restored = sweep(tmp_path, "restored", interrupt=True)
    # Trial 1 stops at the first rung, against the finished trial 0's value recorded there
    # before the interruption (test_..._uninterrupted_and_with_plain_asha: the same without
    # the interruption, and what Ray's own ASHAScheduler does instead).
    assert epochs_run(restored) == [4, 1, 4]
    # The finished trial was not run again: one report per epoch in its results.
    first = sorted(p for p in restored.iterdir() if p.is_dir())[0]
    reported = [json.loads(x)["epochs"] for x in (first / "result.json").read_text().splitlines()]
    assert reported == [1, 2, 3, 4]


# Two more sweeps of the same trials (about a minute on a loaded 2-core machine): the
# comparison that shows why ResumableASHA exists, out of the default run.
@pytest.mark.slow
def test_the_same_sweep_uninterrupted_and_with_plain_asha(ray_local, tmp_path):
    from ray.tune.schedulers import ASHAScheduler

    from ray_pipeline.sweep.scheduler import TIME_ATTR

    assert epochs_run(sweep(tmp_path, "straight")) == [4, 1, 4]
    # Ray's own ASHAScheduler forgets the finished trial's rung values on restore and lets
    # trial 1 run to the end (if Ray starts saving scheduler state, this fails: then
    # ResumableASHA's rebuild is no longer needed).
    plain = ASHAScheduler(time_attr=TIME_ATTR, grace_period=1, reduction_factor=2, max_t=4)
    assert epochs_run(sweep(tmp_path, "plain", scheduler=plain, interrupt=True)) == [4, 4, 4]


def test_resumable_asha_refills_its_rungs_from_recorded_results(tmp_path):
    """No Ray cluster: the replay itself, on a trial folder as Tune leaves it."""
    import pyarrow.fs
    from ray.tune.experiment import Trial

    from ray_pipeline.sweep.scheduler import ResumableASHA

    scheduler = ResumableASHA(
        time_attr="epochs", metric="val_loss", mode="min", grace_period=1, max_t=4,
        reduction_factor=2,
    )  # fmt: skip

    class Restored:  # what on_trial_add reads of a restored Tune trial
        def __init__(self, trial_id: str, status: str, losses: list[float]):
            self.trial_id, self.status, self.relative_logdir = trial_id, status, trial_id
            self.path = str(tmp_path / trial_id)
            self.storage = type("Storage", (), {"storage_filesystem": pyarrow.fs.LocalFileSystem()})
            Path(self.path).mkdir()
            lines = [json.dumps({"epochs": e, "val_loss": v}) for e, v in enumerate(losses, 1)]
            (Path(self.path) / "result.json").write_text("\n".join(lines) + "\n")

    scheduler.on_trial_add(None, Restored("done", Trial.TERMINATED, LOSSES[0]))
    scheduler.on_trial_add(None, Restored("half", Trial.PENDING, LOSSES[2][:2]))
    assert scheduler.rungs() == [
        {"epochs": 1, "recorded": {"done": 0.5, "half": 0.6}},
        {"epochs": 2, "recorded": {"done": 0.4, "half": 0.35}},
        {"epochs": 4, "recorded": {"done": 0.2}},  # recorded when the trial completed
    ]
