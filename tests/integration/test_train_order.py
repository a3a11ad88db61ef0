"""A seed fixes the order the train stage's Ray datasets hand out their rows, although the
curated Parquet is read and tokenized by parallel tasks that finish in any order."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from ray_pipeline.train.stage import make_datasets, prepare
from tests.integration.test_train_stage import curated_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY_CLASSIFIER = {
    "student": {
        "kind": "classifier",
        "model": "tiny",
        "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
    },
    "max_seq_len": 64,
    "val_fraction": 0.1,
    "num_workers": 1,
    "deepspeed": {"enabled": False},
}


def _order(prepared, train, mode, seed):
    ds = make_datasets(prepared, train, fraction=1.0, seed=seed, mode=mode)["train"]
    # What a worker iterates: its shard of streaming_split, as Ray Train's ingest makes it.
    (shard,) = ds.streaming_split(1, equal=True)
    return [tuple(row["input_ids"]) for row in shard.iter_rows()]


def test_the_same_seed_gives_the_same_row_order(ray_local, tmp_path):
    run = curated_run(tmp_path, TINY_CLASSIFIER, n_rows=400)
    # Eight Parquet files: eight read tasks racing each other.
    table = pq.read_table(run.paths.dataset_train)
    for f in run.paths.dataset_train.glob("*.parquet"):
        f.unlink()
    for i in range(8):
        pq.write_table(table.slice(i * 50, 50), run.paths.dataset_train / f"part-{i}.parquet")
    train = run.cfg.train
    prepared = prepare(run, tmp_path / "train")
    # 'materialize': what data_loading auto picks for sets this small (the Jigsaw sets).
    first = _order(prepared, train, "materialize", seed=3)
    assert len(first) == len(prepared.train_ids)
    assert _order(prepared, train, "materialize", seed=3) == first
    assert _order(prepared, train, "materialize", seed=4) != first
