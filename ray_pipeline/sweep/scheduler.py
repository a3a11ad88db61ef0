"""ASHA that decides after ``Tuner.restore`` as it would have without the interruption.

Ray Tune (2.60) does not save a scheduler's state with the experiment: ``TuneController``
leaves ``_scheduler_alg`` out of its saved state, and ``Tuner.restore`` runs with the scheduler
pickled in ``tuner.pkl`` when the sweep *started*, so its rungs are empty. The finished trials
never report again, so a plain ASHAScheduler would judge the resumed trials against rungs that
lack every finished trial's results (with empty rungs it stops nothing).

``ResumableASHA`` rebuilds the rungs while Tune re-adds the restored trials (``on_trial_add``,
called for every restored trial before any of them runs): it replays each trial's recorded
results (``result.json`` in the trial's folder in the sweep's storage, written by Tune's
default JSON logger and synced there with the experiment state it restores from) through
the same ``on_trial_result`` / ``on_trial_complete`` calls the uninterrupted run made, so each
rung holds exactly the values it held when the sweep stopped. Replayed decisions are not acted
on (those trials already ran). A resumed unfinished trial continues from its Ray Train
checkpoint and reports its later epochs; the rungs it already passed keep its replayed values.

Rungs are counted in finished epochs (the ``epochs`` every epoch report carries), not Tune's
``training_iteration``: a restored trial's Tune iteration counter starts again at 1 while its
Ray Train run continues from the epoch it had reached.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow.fs
from ray.air.constants import EXPR_RESULT_FILE
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler

TIME_ATTR = "epochs"  # every epoch report's count of finished epochs (train/loop.py)


def recorded_results(fs: pyarrow.fs.FileSystem, trial_dir: str) -> list[dict[str, Any]]:
    """The results Tune recorded for a trial in its folder on `fs`, in order (none if it
    never reported)."""
    path = f"{trial_dir}/{EXPR_RESULT_FILE}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return []
    with fs.open_input_stream(path) as f:
        text = f.read().decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class ResumableASHA(ASHAScheduler):
    """ASHAScheduler whose rungs survive ``Tuner.restore`` (see the module docstring)."""

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if not trial.relative_logdir:
            return  # a new trial: it has no folder yet, let alone results
        results = [
            r
            for r in recorded_results(trial.storage.storage_filesystem, trial.path)
            if self._time_attr in r and r.get(self._metric) is not None
        ]
        if not results:
            return  # it never reported: nothing to rebuild
        for result in results:
            self.on_trial_result(tune_controller, trial, result)
        if trial.status == Trial.TERMINATED:
            # What Tune called when the trial ended (it records the final rung).
            self.on_trial_complete(tune_controller, trial, results[-1])

    def rungs(self) -> list[dict[str, Any]]:
        """Each rung's milestone (epochs) and the values recorded there (trial id -> metric,
        as Tune reported it), lowest milestone first: what the stage reports and tests read."""
        sign = self._metric_op
        return [
            {"epochs": milestone, "recorded": {t: sign * v for t, v in recorded.items()}}
            for bracket in self._brackets
            for milestone, recorded in reversed(bracket._rungs)
        ]
