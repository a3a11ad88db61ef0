"""Curate stage (Ray Data): filters + exact dedup over the generated rows -> the dataset.

Output: runs/<id>/dataset/train/ (Parquet, the ok rows), dataset/rejected/ (every filtered or
failed row with its reason) and dataset/manifest.json (lineage and counts per reason).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from typing import Any

import pyarrow as pa

from ray_pipeline.config import CurateSection, TaskSection
from ray_pipeline.curate.filters import (
    LabelFilter,
    MarkDuplicates,
    RuleFilter,
    TestOverlapFilter,
    find_exact_duplicates,
    normalize_text,
)
from ray_pipeline.data.manifest import content_hash, source_entry, write_manifest
from ray_pipeline.data.schema import FAILED, FILTERED, OK, to_table
from ray_pipeline.data.sources import read_texts
from ray_pipeline.run_state import Run

log = logging.getLogger("distill.curate")


def _filters_batch(
    batch: pa.Table, cfg: CurateSection, task: TaskSection, test_inputs: dict[str, str]
) -> pa.Table:
    rows = batch.to_pylist()
    for f in (LabelFilter(task), RuleFilter(cfg), TestOverlapFilter(test_inputs)):
        rows = f(rows)
    return to_table(rows)


def _dups_batch(batch: pa.Table, duplicates: dict) -> pa.Table:
    return to_table(MarkDuplicates(duplicates)(batch.to_pylist()))


def eval_set_inputs(run: Run) -> dict[str, str]:
    """{normalised input: test set name} of every configured test set."""
    out: dict[str, str] = {}
    for ts in run.cfg.evaluate.test_sets:
        for rec in read_texts(ts.path, ts.input_field, ts.limit):
            out.setdefault(normalize_text(rec[ts.input_field]), ts.name)
    return out


def run_curate(run: Run) -> dict[str, Any]:
    import ray

    started = time.perf_counter()
    cfg = run.cfg
    run.require("generate")
    rows_dir = str(run.paths.generated_rows)
    test_inputs = eval_set_inputs(run) if cfg.curate.drop_test_overlap else {}
    ds = ray.data.read_parquet(rows_dir).map_batches(
        _filters_batch,
        fn_kwargs={"cfg": cfg.curate, "task": cfg.task, "test_inputs": test_inputs},
        batch_format="pyarrow",
    )
    if cfg.curate.dedup == "exact":
        ds = ds.materialize()
        keys = ds.select_columns(["id", "source", "source_line", "input", "status"]).take_all()
        duplicates = find_exact_duplicates(keys)
        ds = ds.map_batches(
            _dups_batch, fn_kwargs={"duplicates": duplicates}, batch_format="pyarrow"
        )
    ds = ds.materialize()

    run.stage_dir("dataset")
    train_dir, rejected_dir = run.paths.dataset_train, run.paths.dataset_rejected
    for d in (train_dir, rejected_dir):
        shutil.rmtree(d, ignore_errors=True)
    ds.filter(lambda r: r["status"] == OK).write_parquet(str(train_dir))
    ds.filter(lambda r: r["status"] != OK).write_parquet(str(rejected_dir))
    for d in (train_dir, rejected_dir):
        d.mkdir(exist_ok=True)  # an empty selection writes no files

    summary = ds.select_columns(
        ["id", "status", "reason", "label", "teacher", "prompt_hash"]
    ).take_all()
    status = Counter(r["status"] for r in summary)
    reasons = Counter(
        r["reason"].split(":")[0] for r in summary if r["status"] != OK and r["reason"]
    )
    kept = [r for r in summary if r["status"] == OK]
    labels = Counter(r["label"] for r in kept)
    sources = [source_entry(s.path, kind="log") for s in cfg.data.logs]
    if cfg.data.seeds is not None:
        sources.append(source_entry(cfg.data.seeds.path, kind="seeds", n_new=cfg.data.seeds.n_new))
    manifest_path = write_manifest(
        run.paths.dataset_manifest,
        {
            "run_id": run.run_id,
            "dataset": str(train_dir),
            "rejected": str(rejected_dir),
            "rows": len(kept),
            "task": {
                "name": cfg.task.name,
                "label_key": cfg.task.label_key,
                "labels": cfg.task.labels,
            },
            "sources": sources,
            "teacher": {
                "model": cfg.teacher.model,
                "base_url": cfg.teacher.base_url or "simulator",
                "answered_by": dict(Counter(r["teacher"] for r in kept)),
            },
            "prompt_hash": sorted({r["prompt_hash"] for r in kept if r["prompt_hash"]}),
            "filters": cfg.curate.model_dump(mode="json"),
            "counts": {"in": len(summary), **{s: status.get(s, 0) for s in (OK, FILTERED, FAILED)}},
            "reasons": dict(reasons),
            "labels": dict(labels),
            "content_sha256": content_hash([(r["id"], r["label"]) for r in kept]),
        },
    )
    section = {
        "rows_in": len(summary),
        "kept": status.get(OK, 0),
        "filtered": status.get(FILTERED, 0),
        "failed": status.get(FAILED, 0),
        "reasons": dict(reasons),
        "labels": dict(labels),
        "seconds": round(time.perf_counter() - started, 2),
        "outputs": {
            "train": str(train_dir),
            "rejected": str(rejected_dir),
            "manifest": str(manifest_path),
        },
    }
    log.info(
        "curate: kept %s of %s rows; dropped %s",
        section["kept"],
        section["rows_in"],
        section["reasons"],
    )
    return section
