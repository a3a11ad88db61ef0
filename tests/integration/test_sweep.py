"""The sweep stage on a local Ray: a 2-trial Tune grid over dataset fractions, each trial a
2-worker TorchTrainer without DeepSpeed (the plain torch DDP path of the same loop)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_pipeline.config import load_config
from ray_pipeline.data import synthetic
from ray_pipeline.data.manifest import write_manifest
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.data.schema import dumps, new_row, row_id, to_table
from ray_pipeline.run_state import Run

pytestmark = pytest.mark.integration


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


def test_fraction_sweep(ray_local, tmp_path):
    from ray_pipeline.sweep.stage import run_sweep
    from ray_pipeline.train.checkpoint import read_meta

    train = {
        "student": {"model": "tiny", "tiny": {"max_position_embeddings": 128}},
        "lora": {"r": 4, "alpha": 8, "modules_to_save": ["lm_head", "embed_tokens"]},
        "epochs": 2,
        "learning_rate": 0.005,
        "batch_size": 8,
        "max_seq_len": 96,
        "val_fraction": 0.15,
        "deepspeed": {"enabled": False},
    }
    run = curated_run(
        tmp_path, train, {"fractions": [0.5, 1.0], "num_workers": 2, "max_concurrent_trials": 1}
    )
    section = run_sweep(run)

    trials = section["trials"]
    assert [t["config"] for t in trials] == [{"fraction": 0.5}, {"fraction": 1.0}]
    half, full = trials
    # About half: the subset is a seeded hash of the row id (nested, decided row by row).
    assert 0.35 * full["train_rows"] <= half["train_rows"] <= 0.65 * full["train_rows"]
    assert full["train_rows"] + read_meta(full["checkpoint"])["metrics"]["val_rows"] == 160
    # Both trials are scored on the same validation rows; more data (and twice the steps)
    # must fit them better on this learnable task.
    assert full["val_loss"] < half["val_loss"]
    assert section["best"] == full and section["metric"] == "val_loss"
    for t in trials:
        meta = read_meta(t["checkpoint"])
        assert meta["train_rows"] == t["train_rows"] and meta["method"] == "lora"
        # What the workers really consumed: 2 epochs of equal halves of the subset.
        assert meta["metrics"]["examples_seen"] == 2 * (t["train_rows"] // 2 * 2)
        assert meta["train"]["deepspeed"]["enabled"] is False
        assert (Path(t["checkpoint"]) / "adapter" / "adapter_model.safetensors").is_file()
    with open(section["table"]) as f:
        table = list(csv.DictReader(f))
    assert [(r["fraction"], int(r["train_rows"])) for r in table] == [
        ("0.5", half["train_rows"]),
        ("1.0", full["train_rows"]),
    ]
    assert Path(section["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
