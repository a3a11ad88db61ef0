"""The sweep stage on a local Ray: a 3-point dataset-size ablation (each trial a 1-worker
TorchTrainer without DeepSpeed, the plain torch path of the same loop) with its fitted curve,
MLflow and TensorBoard logs; a one-parameter-at-a-time sweep with ASHA, interrupted after its
first trial and resumed with Tuner.restore without running that trial again."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_pipeline.config import load_config
from ray_pipeline.data import synthetic
from ray_pipeline.data.manifest import write_manifest
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.data.schema import dumps, new_row, row_id, to_table
from ray_pipeline.run_state import Run

# Each trial is a TorchTrainer run: minutes apiece on 2 cores, so out of the default run.
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def curated_run(tmp_path: Path, train: dict, sweep: dict, n_rows: int = 160) -> Run:
    prompt = Prompt(synthetic.PROMPT)
    rows = [
        new_row(
            id=row_id("test", t),
            source="test",
            input=t,
            messages=dumps(prompt.messages(t)),
            output=dumps({"toxic": int(synthetic.true_label(t))}),
            label=synthetic.true_label(t),
        )
        for t in synthetic.generate_comments(n_rows, seed=21)
    ]
    dataset = tmp_path / "dataset" / "train"
    dataset.mkdir(parents=True)
    pq.write_table(to_table(rows), dataset / "part-0.parquet")
    manifest = write_manifest(tmp_path / "dataset" / "manifest.json", {"content_sha256": "test"})
    cfg = load_config(
        data={
            "task": synthetic.TASK,
            "teacher": {"simulator": {"enabled": True, "rule": "quickstart"}},
            "data": {"logs": [{"path": "unused.jsonl"}]},
            "train": train,
            "sweep": sweep,
        }
    )
    (tmp_path / "report.json").write_text(
        json.dumps({"curate": {"outputs": {"train": str(dataset), "manifest": str(manifest)}}})
    )
    return Run(cfg=cfg, run_id="test", dir=tmp_path)


TRAIN = {
    "student": {"model": "tiny", "tiny": {"max_position_embeddings": 128}},
    "lora": {"r": 4, "alpha": 8, "modules_to_save": ["lm_head", "embed_tokens"]},
    "epochs": 2,
    "learning_rate": 0.005,
    "batch_size": 8,
    "max_seq_len": 96,
    "val_fraction": 0.15,
    "deepspeed": {"enabled": False},
}


def test_size_ablation_sweep(ray_local, tmp_path):
    from ray_pipeline.sweep.analysis import saturating_power_law
    from ray_pipeline.sweep.stage import run_sweep
    from ray_pipeline.train.checkpoint import read_meta

    run = curated_run(
        tmp_path,
        TRAIN,
        {"fractions": [0.25, 0.5, 1.0], "num_workers": 1, "max_concurrent_trials": 1},
    )
    section = run_sweep(run)

    trials = section["trials"]
    assert [t["config"] for t in trials] == [{"fraction": f} for f in (0.25, 0.5, 1.0)]
    quarter, half, full = trials
    # About half: the subset is a seeded hash of the row id (nested, decided row by row).
    assert 0.35 * full["train_rows"] <= half["train_rows"] <= 0.65 * full["train_rows"]
    assert quarter["train_rows"] < half["train_rows"]
    assert full["train_rows"] + read_meta(full["checkpoint"])["metrics"]["val_rows"] == 160
    # Every trial is scored on the same validation rows; more data (and more steps) must fit
    # them better on this learnable task.
    assert full["val_loss"] < half["val_loss"] < quarter["val_loss"]
    assert section["best"] == full and section["metric"] == "val_loss"
    for t in trials:
        meta = read_meta(t["checkpoint"])
        assert meta["train_rows"] == t["train_rows"] and meta["method"] == "lora"
        # What the worker really consumed: 2 epochs of the subset.
        assert meta["metrics"]["examples_seen"] == 2 * t["train_rows"]
        assert meta["train"]["deepspeed"]["enabled"] is False
        assert (Path(t["checkpoint"]) / "adapter" / "adapter_model.safetensors").is_file()
        assert t["epochs_run"] == 2 and t["stopped_early"] is False
    with open(section["table"]) as f:
        table = list(csv.DictReader(f))
    assert [(r["fraction"], int(r["train_rows"])) for r in table] == [
        (str(t["config"]["fraction"]), t["train_rows"]) for t in trials
    ]
    assert Path(section["table_md"]).read_text().count("\n") == 2 + 3
    # A saturating power law is fitted to the three points (how well it fits is the data's
    # business: this barely trained tiny student is far from any plateau; the unit tests
    # check that the fit recovers a known curve) and expects a gain from doubling the data.
    fit = section["ablation"]["fit"]
    assert fit["fitted"] and fit["form"] == "a * n^-b + c" and fit["rows"] == full["train_rows"]
    assert fit["at_rows"] == pytest.approx(
        saturating_power_law(full["train_rows"], fit["a"], fit["b"], fit["c"])
    )
    assert fit["at_double_rows"] < fit["at_rows"] and fit["gain_from_doubling"] > 0
    assert Path(section["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # MLflow's file store holds one run per trial; TensorBoard event files in each trial folder.
    mlruns = Path(section["mlflow"].removeprefix("file://"))
    assert len(list(mlruns.glob("*/*/metrics/val_loss"))) == 3
    assert len(list(Path(section["tensorboard"]).glob("*/events.out.tfevents.*"))) == 3
    from ray_pipeline.report import render_markdown

    md = render_markdown({"sweep": section})
    assert f"from {full['train_rows']} to {2 * full['train_rows']} rows" in md


def test_one_at_a_time_sweep_with_asha_resumes_after_an_interruption(ray_local, tmp_path):
    from ray import tune

    from ray_pipeline.sweep.stage import SweepInterrupted, run_sweep

    class Interrupt(tune.Callback):
        def __init__(self, marker: Path):
            self.marker, self.done = marker, 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            if self.done == 1 and not self.marker.exists():
                self.marker.write_text("interrupted")
                os.kill(os.getpid(), signal.SIGINT)

    sweep = {
        "search": "one_at_a_time",
        "learning_rate": [0.0005, 0.005, 0.02],  # 0.005 is the train section's: the baseline
        "scheduler": "asha",
        "asha": {"grace_period": 1, "reduction_factor": 2},
        "num_workers": 1,
        "mlflow": False,
    }
    run = curated_run(tmp_path, TRAIN, sweep, n_rows=96)
    with pytest.raises(SweepInterrupted, match="1 of 3 trials finished"):
        run_sweep(run, callbacks=[Interrupt(tmp_path / "interrupted")])
    # Ctrl-C kills the running trial's Train controller; in a CLI run the embedded Ray ends
    # with the process. This session's Ray lives on, and without a dashboard Ray Train's
    # placement-group cleaner cannot free the killed controller's workers' bundle: free it.
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    for pg_id, pg in placement_group_table().items():
        if pg["state"] == "CREATED":
            remove_placement_group(PlacementGroup(ray_local.PlacementGroupID.from_hex(pg_id)))
    first = sorted((tmp_path / "sweep" / "trials").iterdir())
    # The finished trial (and the one Ctrl-C stopped, if it had started).
    assert 1 <= len(first) <= 2 and first[0].name.endswith("_00000")
    finished_checkpoints = sorted(first[0].glob("checkpoint_*"))

    section = run_sweep(run)  # the same command again: resumes
    assert section["resumed"] is True
    trials = section["trials"]
    assert [t["config"]["varied"] for t in trials] == ["baseline", "learning_rate", "learning_rate"]
    assert [t["config"]["learning_rate"] for t in trials] == [0.005, 0.0005, 0.02]
    # The finished trial was not run again: the same checkpoints, no new ones.
    assert sorted(first[0].glob("checkpoint_*")) == finished_checkpoints
    assert trials[0]["checkpoint"].startswith(str(first[0]))
    assert all(t["val_loss"] is not None for t in trials)
    # ASHA compares trials at each epoch; a stopped trial ran fewer epochs than asked.
    assert all(t["stopped_early"] == (t["epochs_run"] < 2) for t in trials)
    assert section["best"]["val_loss"] == min(t["val_loss"] for t in trials)
    assert Path(section["param_plots"]["learning_rate"]).read_bytes()[:4] == b"\x89PNG"
