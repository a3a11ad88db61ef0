"""Train stage: the curated dataset -> a student checkpoint, with Ray Train (+ DeepSpeed).

The driver does the cheap, global work once: read the dataset, split off validation rows,
build (tiny) or load (hub) the tokenizer, tokenize with label masking, and for the tiny student
build its random weights (seeded by run.seed, so every worker starts from the same model).
Workers (``ray_pipeline.train.loop``) only train. The sweep stage reuses ``prepare`` and
``make_trainer``, so a sweep trial trains exactly like this stage.

runs/<id>/train/ is Ray Train's run folder; beside Ray's own files it holds checkpoint/ (the
student), tokenizer/, student_base/ (tiny only) and loss.png.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_pipeline.config import TrainSection
from ray_pipeline.run_state import Run
from ray_pipeline.train.data import Example

log = logging.getLogger("distill.train")

# Ray Train's controller polls workers every 2 s by default: seconds lost at start and end of
# every fit, which dominate small runs and sweeps. Set before a trainer is built (Ray passes it
# on to the controller); an explicit environment setting wins.
HEALTH_CHECK_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


@dataclass
class Prepared:
    """What every training run on one dataset shares; built once by the driver (the sweep
    ships it to its trials through the object store)."""

    train_examples: list[Example]
    val_examples: list[Example]
    encoded: dict[str, dict[str, list[int]]]  # example id -> {"input_ids", "labels"}
    tokenizer_dir: str
    model_source: str  # what workers load the weights from (a directory or a hub id)
    base_dir: str | None  # tiny student: its saved random base, copied into LoRA checkpoints
    base_model: str  # "tiny" or the hub id / absolute path, recorded in the checkpoint
    pad_id: int
    truncated: int  # examples cut at max_seq_len
    lineage: dict[str, Any]  # kind, manifest, dataset hash, task labels: into every checkpoint


def curated_dataset(run: Run) -> tuple[str, str]:
    """(dataset dir, manifest path) from the curate stage's report section."""
    run.require("curate")
    return str(run.paths.dataset_train), str(run.paths.dataset_manifest)


def _student_assets(
    train: TrainSection,
    train_examples: list[Example],
    out_dir: Path,
    seed: int,
    labels: list[str],
) -> tuple[Any, str, str | None, str]:
    """(tokenizer, model_source, base_dir, base_model) for the configured student."""
    from ray_pipeline.train.model import TINY, build_tiny_model
    from ray_pipeline.train.tokenizer import (
        build_tiny_tokenizer,
        load_hub_tokenizer,
        tokenizer_corpus,
    )

    student = train.student
    if student.model == TINY:
        tokenizer = build_tiny_tokenizer(tokenizer_corpus(train_examples), student.tiny.vocab_size)
        base_dir = out_dir / "student_base"
        shutil.rmtree(base_dir, ignore_errors=True)
        build_tiny_model(tokenizer, student.tiny, seed, student.kind, labels).save_pretrained(
            base_dir
        )
        log.info(
            "tiny student: vocabulary %d, weights seeded with %d, saved to %s",
            len(tokenizer),
            seed,
            base_dir,
        )
        return tokenizer, str(base_dir), str(base_dir), TINY
    # A local directory is recorded absolute: the checkpoint must find it from anywhere.
    model = str(Path(student.model).absolute()) if Path(student.model).exists() else student.model
    tokenizer_src = student.tokenizer or model
    if Path(tokenizer_src).exists():
        tokenizer_src = str(Path(tokenizer_src).absolute())
    tokenizer = load_hub_tokenizer(tokenizer_src)
    _check_positions(model, train.max_seq_len)
    return tokenizer, model, None, model


def _check_positions(model: str, max_seq_len: int) -> None:
    from transformers import AutoConfig

    positions = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)
    if positions is not None and max_seq_len > positions:
        raise ValueError(
            f"train.max_seq_len ({max_seq_len}) exceeds {model}'s max_position_embeddings ({positions})"
        )


def prepare(run: Run, out_dir: Path) -> Prepared:
    """Read, split and tokenize the curated dataset; make the tokenizer and (tiny) base model
    under `out_dir`."""
    from ray_pipeline.data.manifest import read_manifest
    from ray_pipeline.train.data import (
        encode_classifier_examples,
        encode_examples,
        load_examples,
        split_examples,
    )
    from ray_pipeline.train.model import CLASSIFIER

    train, task = run.cfg.train, run.cfg.task
    dataset, manifest_path = curated_dataset(run)
    examples = load_examples(dataset, train.target)
    train_examples, val_examples = split_examples(examples, train.val_fraction)
    tokenizer, model_source, base_dir, base_model = _student_assets(
        train, train_examples, out_dir, run.cfg.run.seed, task.labels
    )
    tokenizer_dir = out_dir / "tokenizer"
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    tokenizer.save_pretrained(tokenizer_dir)
    everything = train_examples + val_examples
    truncated = 0
    if train.student.kind == CLASSIFIER:
        rows, truncated = encode_classifier_examples(
            tokenizer, everything, train.max_seq_len, task.labels
        )
    else:
        rows = encode_examples(tokenizer, everything, train.max_seq_len)
    encoded = dict(zip((ex.id for ex in everything), rows, strict=True))
    manifest = read_manifest(manifest_path)
    log.info(
        "dataset %s: %d training rows, %d validation rows, %d cut at max_seq_len %d",
        dataset,
        len(train_examples),
        len(val_examples),
        truncated,
        train.max_seq_len,
    )
    return Prepared(
        train_examples=train_examples,
        val_examples=val_examples,
        encoded=encoded,
        tokenizer_dir=str(tokenizer_dir),
        model_source=model_source,
        base_dir=base_dir,
        base_model=base_model,
        pad_id=tokenizer.pad_token_id,
        truncated=truncated,
        lineage={
            "kind": train.student.kind,
            "manifest": manifest_path,
            "dataset": dataset,
            "dataset_content_sha256": manifest.get("content_sha256"),
            "label_key": task.label_key,
            "labels": task.labels,
            "task": task.name,
            # How a served classifier finds the input inside a chat request.
            "prompt": {
                "template": task.prompt.text(),
                "placeholder": task.prompt.placeholder,
                "system": task.prompt.system,
            },
            "pad_id": tokenizer.pad_token_id,
        },
    )


def worker_config(
    prepared: Prepared,
    train: TrainSection,
    train_examples: list[Example],
    num_workers: int,
    seed: int,
) -> dict[str, Any]:
    """The train_loop_config every worker gets (``loop.Job``): plain, picklable data."""
    from ray_pipeline.train.loop import schedule_steps

    return {
        "train": train.model_dump(mode="json"),
        "model_source": prepared.model_source,
        "tokenizer_dir": prepared.tokenizer_dir,
        "base_dir": prepared.base_dir,
        "pad_id": prepared.pad_id,
        "total_steps": schedule_steps(train, len(train_examples), num_workers),
        "seed": seed,
        "train_rows": len(train_examples),
        "val_rows": len(prepared.val_examples),
        "meta": {
            "base_model": prepared.base_model,
            **prepared.lineage,
            "train": train.model_dump(mode="json"),
            "train_rows": len(train_examples),
            "seed": seed,
        },
    }


def _dataset(rows: list[dict[str, Any]]) -> Any:
    """An in-memory Ray Dataset without progress bars: bars for a dataset that streams in
    a second, re-drawn every epoch by every worker, only bury the training log. (A dataset
    keeps a copy of the DataContext it was made under.)"""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    previous, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        return ray.data.from_items(rows)
    finally:
        ctx.enable_progress_bars = previous


def make_trainer(
    prepared: Prepared,
    train: TrainSection,
    train_examples: list[Example],
    *,
    num_workers: int,
    storage_path: Path,
    name: str,
    seed: int,
    callbacks: list[Any] | None = None,
) -> Any:
    """A TorchTrainer for `train` on `train_examples` (the validation rows are always all of
    prepared.val_examples, so runs on subsets are compared on the same rows)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_pipeline.train.loop import train_loop_per_worker

    if len(train_examples) < num_workers:
        raise ValueError(
            f"{len(train_examples)} training rows cannot be split over {num_workers} workers"
        )
    for key, value in HEALTH_CHECK_ENV.items():
        os.environ.setdefault(key, value)
    # One seeded shuffle up front: blocks are not in dataset order (e.g. sorted by source),
    # and each epoch shuffles further inside a local buffer.
    rows = [prepared.encoded[ex.id] for ex in train_examples]
    random.Random(seed).shuffle(rows)
    datasets = {"train": _dataset(rows)}
    if prepared.val_examples:
        datasets["val"] = _dataset([prepared.encoded[ex.id] for ex in prepared.val_examples])
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(prepared, train, train_examples, num_workers, seed),
        # use_gpu adds one GPU per worker; Ray picks nccl on GPU, gloo on CPU.
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker},
        ),
        run_config=RunConfig(storage_path=str(storage_path), name=name, callbacks=callbacks),
        datasets=datasets,
    )


def summary_metrics(final: dict[str, Any]) -> dict[str, Any]:
    """The report's metrics from the final worker report (everything but the history)."""
    keys = (
        "train_loss",
        "val_loss",
        "epochs",
        "steps",
        "train_rows",
        "val_rows",
        "tokens",
        "target_tokens",
        "examples_seen",
        "examples_per_s",
    )
    return {k: final.get(k) for k in keys}


def set_threshold(checkpoint: str, val_examples: list[Example], cfg: Any) -> dict[str, Any] | None:
    """For a binary classifier: choose its decision threshold on the validation rows (for
    train.threshold.metric), store it in the checkpoint, return it. None otherwise (other
    students, more than two labels, or no validation rows: the checkpoint then takes the
    most probable label)."""
    from ray_pipeline.train.checkpoint import update_meta
    from ray_pipeline.train.model import CLASSIFIER
    from ray_pipeline.train.student import Student
    from ray_pipeline.train.threshold import choose_threshold

    train, labels = cfg.train, cfg.task.labels
    if train.student.kind != CLASSIFIER or len(labels) != 2 or not val_examples:
        return None
    positive = train.threshold.positive_label or labels[-1]
    student = Student.load(checkpoint, device="cuda" if train.use_gpu else "cpu")
    probs = student.class_probs([ex.input or "" for ex in val_examples])
    index = labels.index(positive)
    truth = [ex.label == positive for ex in val_examples]
    value, score = choose_threshold([p[index] for p in probs], truth, train.threshold.metric)
    threshold = {
        "positive_label": positive,
        "value": value,
        "metric": train.threshold.metric,
        "val_score": score,
        "val_rows": len(val_examples),
    }
    update_meta(checkpoint, threshold=threshold)
    log.info("threshold: %s", threshold)
    return threshold


def run_train(run: Run) -> dict[str, Any]:
    from ray_pipeline.train.plots import plot_loss_curve

    started = time.perf_counter()
    train = run.cfg.train
    # A re-run replaces the previous one: Ray Train would otherwise take the old run folder of
    # the same name for a run to resume.
    shutil.rmtree(run.paths.train, ignore_errors=True)
    out = run.stage_dir("train")
    prepared = prepare(run, out)
    trainer = make_trainer(
        prepared,
        train,
        prepared.train_examples,
        num_workers=train.num_workers,
        storage_path=run.dir,
        name="train",
        seed=run.cfg.run.seed,
    )
    fit_started = time.perf_counter()
    result = trainer.fit()
    fit_seconds = time.perf_counter() - fit_started
    final = result.metrics
    checkpoint = str(Path(result.checkpoint.path).absolute())
    threshold = set_threshold(checkpoint, prepared.val_examples, run.cfg)
    history = final["history"]
    plot = plot_loss_curve(
        history, out / "loss.png", f"{run.run_id}: {train.method} on {prepared.base_model}"
    )
    section = {
        "checkpoint": checkpoint,
        "kind": train.student.kind,
        "metrics": {**summary_metrics(final), "fit_seconds": round(fit_seconds, 2)},
        "threshold": threshold,
        "truncated": prepared.truncated,
        "workers": train.num_workers,
        "use_gpu": train.use_gpu,
        "zero_stage": train.deepspeed.zero_stage if train.deepspeed.enabled else None,
        "method": train.method,
        "model": prepared.base_model,
        "manifest": prepared.lineage["manifest"],
        "history": history,
        "plot": str(plot),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("train: %s; checkpoint %s", section["metrics"], section["checkpoint"])
    return section
