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

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_pipeline.config import LogSource, TrainSection
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
    ships it to its trials through the object store). The driver reads only the row ids and
    the validation rows: Ray Data reads and tokenizes the training rows (``make_datasets``)."""

    dataset: str  # the curated Parquet directory (on the driver)
    data_source: str  # the same for Ray Data: its URI when the run is mirrored (trials anywhere)
    dataset_bytes: int  # its size on disk (for data_loading: auto)
    train_ids: list[str]  # the training rows' ids (counts of subsets)
    train_labels: list[str | None]  # their labels, in the same order (class weights)
    val_examples: list[Example]  # validation rows: the validation loss and the threshold
    tokenizer: Any  # shipped to the tokenization tasks and the workers
    tokenizer_dir: str
    model_source: str  # what workers load the weights from (a directory or a hub id)
    base_dir: str | None  # tiny student: its saved random base, copied into LoRA checkpoints
    base_model: str  # "tiny" or the hub id / absolute path, recorded in the checkpoint
    pad_id: int
    lineage: dict[str, Any]  # kind, manifest, dataset hash, task labels: into every checkpoint

    def train_rows(self, fraction: float, seed: int) -> int:
        """Training rows in the `fraction` subset (``data.in_subset``)."""
        from ray_pipeline.train.data import in_subset

        return sum(in_subset(i, fraction, seed) for i in self.train_ids)


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
    """Split the curated dataset by row id, read the validation rows, make the tokenizer (and
    the tiny base model) under `out_dir`. Tokenizing is Ray Data's (``make_datasets``)."""
    import pyarrow.parquet as pq

    from ray_pipeline.data.manifest import read_manifest
    from ray_pipeline.train.data import in_split, load_examples

    train, task = run.cfg.train, run.cfg.task
    dataset, manifest_path = curated_dataset(run)
    if not Path(dataset).exists():
        raise FileNotFoundError(f"curated dataset {dataset} does not exist; run `distill curate`")
    table = pq.read_table(dataset, columns=["id", "label"])
    ids = [str(i) for i in table.column("id").to_pylist()]
    label_of = dict(zip(ids, table.column("label").to_pylist(), strict=True))
    train_ids = [i for i in ids if in_split(i, "train", train.val_fraction)]
    if not train_ids:
        raise ValueError(
            f"curated dataset {dataset}: no training rows left of {len(ids)} after holding out "
            f"train.val_fraction={train.val_fraction}"
        )
    soft_rows = _check_soft_targets(dataset, len(ids)) if train.distill.weight > 0 else 0
    val_ids = set(ids) - set(train_ids)
    val_examples = load_examples(dataset, train.target, only=val_ids) if val_ids else []
    # The tiny student's tokenizer is trained on the training texts: only then are they read
    # here (the test student, on small data).
    corpus = (
        load_examples(dataset, train.target, only=set(train_ids))
        if train.student.model == "tiny"
        else []
    )
    tokenizer, model_source, base_dir, base_model = _student_assets(
        train, corpus, out_dir, run.cfg.run.seed, task.labels
    )
    tokenizer_dir = out_dir / "tokenizer"
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    tokenizer.save_pretrained(tokenizer_dir)
    # Workers (on any node) load what was made here: from the run's URI when it has one.
    run.push()
    shared_base = run.shared(base_dir) if base_dir is not None else None
    manifest = read_manifest(manifest_path)
    log.info(
        "dataset %s: %d training rows, %d validation rows",
        dataset,
        len(train_ids),
        len(val_examples),
    )
    return Prepared(
        dataset=dataset,
        data_source=run.shared(dataset),
        dataset_bytes=sum(f.stat().st_size for f in Path(dataset).rglob("*.parquet")),
        train_ids=train_ids,
        train_labels=[label_of[i] for i in train_ids],
        val_examples=val_examples,
        tokenizer=tokenizer,
        tokenizer_dir=run.shared(tokenizer_dir),
        model_source=shared_base if model_source == base_dir else model_source,
        base_dir=shared_base,
        base_model=base_model,
        pad_id=tokenizer.pad_token_id,
        lineage={
            "kind": train.student.kind,
            "manifest": manifest_path,
            "dataset": dataset,
            "dataset_content_sha256": manifest.get("content_sha256"),
            "label_key": task.label_key,
            "labels": task.labels,
            "label_aliases": task.label_aliases,
            "task": task.name,
            # What `distill evaluate CHECKPOINT --data FILE` needs to score a generative
            # student with no run config: the kind of task and its answers' JSON Schema.
            "task_kind": task.kind,
            "output_schema": task.output_schema,
            # How a served classifier finds the input inside a chat request.
            "prompt": {
                "template": task.prompt.text(),
                "placeholder": task.prompt.placeholder,
                "system": task.prompt.system,
            },
            "pad_id": tokenizer.pad_token_id,
            "rows_with_teacher_logprobs": soft_rows,
        },
    )


def _check_soft_targets(dataset: str, rows: int) -> int:
    """How many rows have the teacher's logprobs; logit distillation needs some."""
    import pyarrow.parquet as pq

    column = pq.read_table(dataset, columns=["teacher_logprobs"]).column("teacher_logprobs")
    with_logprobs = rows - column.null_count
    if with_logprobs == 0:
        raise ValueError(
            f"train.distill.weight > 0, but none of the {rows} rows of {dataset} has the "
            "teacher's logprobs: set teacher.top_logprobs (with a teacher that returns them) "
            "and run generate again, or set train.distill.weight: 0"
        )
    log.info("logit distillation: %d of %d rows have the teacher's logprobs", with_logprobs, rows)
    return with_logprobs


def class_weights(
    train: TrainSection, row_labels: list[str | None], labels: list[str]
) -> list[float] | None:
    """Per-label loss weights for train.class_weights: 'balanced' is scikit-learn's
    rows / (classes x rows of the class), over the training split's labels; None for 'none'."""
    if train.class_weights == "none":
        return None
    import numpy as np
    from sklearn.utils.class_weight import compute_class_weight

    missing = sorted(set(labels) - set(row_labels))
    if missing:
        raise ValueError(
            f"train.class_weights: balanced needs training rows of every label; none has "
            f"label(s) {missing}"
        )
    weights = compute_class_weight("balanced", classes=np.array(labels), y=np.array(row_labels))
    return [float(w) for w in weights]


def worker_config(
    prepared: Prepared, train: TrainSection, train_rows: int, num_workers: int, seed: int
) -> dict[str, Any]:
    """The train_loop_config every worker gets (``loop.Job``): plain, picklable data."""
    from ray_pipeline.train.loop import schedule_steps

    weights = (
        class_weights(train, prepared.train_labels, prepared.lineage["labels"])
        if train.student.kind == "classifier"
        else None
    )
    return {
        "class_weights": weights,
        "train": train.model_dump(mode="json"),
        "model_source": prepared.model_source,
        "tokenizer_dir": prepared.tokenizer_dir,
        "base_dir": prepared.base_dir,
        "pad_id": prepared.pad_id,
        "total_steps": schedule_steps(train, train_rows, num_workers),
        "seed": seed,
        "train_rows": train_rows,
        "val_rows": len(prepared.val_examples),
        "meta": {
            "base_model": prepared.base_model,
            **prepared.lineage,
            "train": train.model_dump(mode="json"),
            "train_rows": train_rows,
            "seed": seed,
            "class_weights": weights,
        },
    }


# Ray Data's read and tokenize tasks: a quarter CPU each, so they still run beside workers
# that reserve nearly every CPU of a small machine.
DATA_TASK_CPUS = 0.25
# data_loading auto: below this much Parquet, reading it once beats reading it every epoch.
MATERIALIZE_BELOW_BYTES = 256 * 2**20


def data_loading_mode(train: TrainSection, dataset_bytes: int, workers_cpus: float) -> str:
    """'stream' or 'materialize' for train.data_loading (see its description)."""
    import ray

    if train.data_loading != "auto":
        return train.data_loading
    free = ray.cluster_resources().get("CPU", 0.0) - workers_cpus
    return "materialize" if free < 1 or dataset_bytes < MATERIALIZE_BELOW_BYTES else "stream"


def _encode_table(batch: dict[str, Any], **kwargs: Any) -> Any:
    """``data.encode_rows`` as a pyarrow table of fixed types: a batch with no rows of its
    split must not give Ray Data a column of unknown type."""
    import pyarrow as pa

    from ray_pipeline.train.data import encode_rows

    rows = encode_rows(batch, **kwargs)
    ids = pa.list_(pa.int32())
    classifier = kwargs["kind"] == "classifier"
    fields = [
        ("input_ids", ids),
        ("labels", pa.int64() if classifier else ids),
        ("truncated", pa.bool_()),
    ]
    if kwargs["soft_targets"]:
        fields += (
            [("soft_probs", pa.list_(pa.float32())), ("soft_mask", pa.bool_())]
            if classifier
            else [
                ("soft_ids", pa.list_(pa.list_(pa.int32()))),
                ("soft_logprobs", pa.list_(pa.list_(pa.float32()))),
            ]
        )
    return pa.table(rows, schema=pa.schema(fields))


def make_datasets(
    prepared: Prepared, train: TrainSection, *, fraction: float, seed: int, mode: str
) -> dict[str, Any]:
    """{"train", "val"} Ray Datasets of tokenized examples, read from the curated Parquet.

    Ray Data reads and tokenizes in its own tasks (the tokenizer travels with them), the
    training rows in a seeded random order. 'stream' leaves the datasets lazy: each epoch
    reads again, block by block, as the workers consume it (the training rows in a seeded
    random block order; each epoch shuffles further in a local buffer). 'materialize' runs
    the pipeline once now, with a full seeded shuffle, into the object store.

    The order is a function of the seed: Ray Data keeps blocks in their input order
    (preserve_order) instead of the order its tasks finish in, so the seeded shuffles start
    from the same sequence in every run (``make_trainer`` keeps it for the workers' shards)."""
    import ray.data

    from ray_pipeline.train.data import EXAMPLE_COLUMNS

    ctx = ray.data.DataContext.get_current()
    # Bars for a dataset re-read every epoch by every worker bury the training log; a
    # dataset keeps a copy of the DataContext it was made under.
    previous, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    ordered, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        datasets = {}
        for split in ("train", "val"):
            if split == "val" and not prepared.val_examples:
                continue
            ds = ray.data.read_parquet(
                prepared.data_source, columns=list(EXAMPLE_COLUMNS), num_cpus=DATA_TASK_CPUS
            ).map_batches(
                _encode_table,
                fn_kwargs={
                    "split": split,
                    "val_fraction": train.val_fraction,
                    "tokenizer": prepared.tokenizer,
                    "kind": train.student.kind,
                    "max_seq_len": train.max_seq_len,
                    "labels": prepared.lineage["labels"],
                    "target": train.target,
                    "fraction": fraction,
                    "seed": seed,
                    "soft_targets": train.distill.weight > 0,
                    "aliases": prepared.lineage["label_aliases"],
                },
                batch_format="numpy",
                num_cpus=DATA_TASK_CPUS,
            )
            if split == "train":
                ds = (
                    ds.random_shuffle(seed=seed, num_cpus=DATA_TASK_CPUS)
                    if mode == "materialize"
                    else ds.randomize_block_order(seed=seed)
                )
            datasets[split] = ds.materialize() if mode == "materialize" else ds
        return datasets
    finally:
        ctx.enable_progress_bars = previous
        ctx.execution_options.preserve_order = ordered


def make_trainer(
    prepared: Prepared,
    train: TrainSection,
    datasets: dict[str, Any],
    train_rows: int,
    *,
    num_workers: int,
    storage_path: str,
    name: str,
    seed: int,
    callbacks: list[Any] | None = None,
) -> Any:
    """A TorchTrainer for `train` on `datasets` (``make_datasets``; the validation rows are
    always all of prepared.val_examples, so runs on subsets are compared on the same rows).
    Placement, resources, checkpoints kept and failures survived come from `train`."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_pipeline.train.loop import train_loop_per_worker

    if train_rows < num_workers:
        raise ValueError(f"{train_rows} training rows cannot be split over {num_workers} workers")
    for key, value in HEALTH_CHECK_ENV.items():
        os.environ.setdefault(key, value)
    resources = {"CPU": train.cpus_per_worker, **train.resources_per_worker}
    if train.use_gpu:
        resources["GPU"] = train.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(prepared, train, train_rows, num_workers, seed),
        # Ray picks nccl on GPU, gloo on CPU.
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker=resources,
            placement_strategy=train.placement_strategy,
            accelerator_type=train.accelerator_type,
        ),
        run_config=RunConfig(
            storage_path=storage_path,
            name=name,
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=train.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
        datasets=datasets,
        # The workers' shards in the datasets' own order (Ray's default ingest lets blocks
        # arrive as tasks finish): with the seeded shuffles, a seed fixes the data order.
        dataset_config=DataConfig(execution_options=_ordered_ingest()),
    )


def _ordered_ingest() -> Any:
    """Ray Train's default ingest options with preserve_order on."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def summary_metrics(final: dict[str, Any]) -> dict[str, Any]:
    """The report's metrics from the final worker report (everything but the histories)."""
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
        "tokens_per_s",
        "truncated",
        "resumed_from",
    )
    return {k: final.get(k) for k in keys}


def threshold_rows(
    val_examples: list[Example], logs: list[LogSource]
) -> tuple[list[Example], list[str]]:
    """(the validation rows a decision threshold is chosen on, the sources left out): every
    row but those of logs marked ``in_distribution: false`` (rows gathered for balance, whose
    class mix is not production's). When that leaves none, all rows."""
    excluded = sorted(str(src.path) for src in logs if not src.in_distribution)
    rows = [ex for ex in val_examples if ex.source not in excluded]
    if not rows:
        if excluded:
            log.warning(
                "threshold: every validation row comes from a log marked in_distribution: "
                "false (%s); the threshold is chosen on all of them",
                ", ".join(excluded),
            )
        return val_examples, []
    return rows, excluded


def set_threshold(checkpoint: str, val_examples: list[Example], cfg: Any) -> dict[str, Any] | None:
    """For a binary classifier: choose its decision threshold on the validation rows (for
    train.threshold.metric; ``threshold_rows``), store it in the checkpoint, return it. None otherwise (other
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
    rows, excluded = threshold_rows(val_examples, cfg.data.logs)
    student = Student.load(checkpoint, device="cuda" if train.use_gpu else "cpu")
    probs = student.class_probs([ex.input or "" for ex in rows])
    index = labels.index(positive)
    truth = [ex.label == positive for ex in rows]
    value, score = choose_threshold([p[index] for p in probs], truth, train.threshold.metric)
    threshold = {
        "positive_label": positive,
        "value": value,
        "metric": train.threshold.metric,
        "val_score": score,
        "val_rows": len(rows),
        "excluded_val_rows": len(val_examples) - len(rows),
        "excluded_sources": excluded,
    }
    update_meta(checkpoint, threshold=threshold)
    log.info("threshold: %s", threshold)
    return threshold


RESUME_FILE = "distill_resume.json"  # beside Ray's run state: which run it belongs to


def _storage(run: Run) -> tuple[str, str]:
    """(storage_path, Ray run name) of the train stage: the run folder (Ray's run is
    runs/<id>/train; for a mirrored run, under its URI), or train.storage_path with the run id
    in the name."""
    if run.cfg.train.storage_path is None:
        return run.uri or str(run.dir.absolute()), "train"
    return run.cfg.train.storage_path, f"{run.run_id}-train"


def _filesystem(storage_path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a local path or a cloud URI."""
    import pyarrow.fs

    uri = storage_path if "://" in storage_path else str(Path(storage_path).absolute())
    return pyarrow.fs.FileSystem.from_uri(uri)


def resume_key(run: Run, prepared: Prepared) -> str:
    """What a resumed run must share with the one it resumes: the train config, the seed and
    the dataset content."""
    import hashlib

    key = {
        "train": run.cfg.train.model_dump(mode="json"),
        "seed": run.cfg.run.seed,
        "dataset": prepared.lineage["dataset_content_sha256"],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def open_storage(run: Run, key: str) -> bool:
    """Keep the Ray Train run of an unfinished earlier attempt with the same `key` (Ray then
    hands its newest checkpoint to the workers: True), or clear it for a fresh one (False)."""
    import pyarrow.fs

    storage_path, name = _storage(run)
    fs, root = _filesystem(storage_path)
    folder = f"{root}/{name}"
    marker = f"{folder}/{RESUME_FILE}"
    if fs.get_file_info(marker).type == pyarrow.fs.FileType.File:
        with fs.open_input_stream(marker) as f:
            previous = json.loads(f.read())
        if previous["key"] == key and not previous["finished"]:
            log.info("an unfinished train run with this config is in %s: resuming it", folder)
            return True
        why = "it finished" if previous["key"] == key else "its config or data differ"
        log.info("starting the train run afresh in %s (%s)", folder, why)
    if fs.get_file_info(folder).type == pyarrow.fs.FileType.Directory:
        # Ray Train would otherwise take the old run of the same name for one to resume.
        for info in fs.get_file_info(pyarrow.fs.FileSelector(folder)):
            if info.base_name in ("tokenizer", "student_base"):
                continue  # made for this attempt already (prepare ran)
            if info.type == pyarrow.fs.FileType.Directory:
                fs.delete_dir(info.path)
            else:
                fs.delete_file(info.path)
            if run.uri is not None and run.cfg.train.storage_path is None:
                # the mirror's copy of what was just deleted at the URI (the last attempt's
                # checkpoint/ and loss.png), so that its manifest stops listing them
                mine = run.dir / name / info.base_name
                shutil.rmtree(mine, ignore_errors=True)
                mine.unlink(missing_ok=True)
        run.push()
    _write_marker(fs, marker, key, finished=False)
    return False


def _write_marker(fs: Any, marker: str, key: str, *, finished: bool) -> None:
    fs.create_dir(marker.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(marker) as f:
        f.write(json.dumps({"key": key, "finished": finished}).encode())


def local_checkpoint(result_checkpoint: Any, out: Path) -> str:
    """The final checkpoint as a local directory: where Ray wrote it, or downloaded from a
    cloud storage_path into `out`/checkpoint."""
    path = result_checkpoint.path
    if Path(path).is_dir():
        return str(Path(path).absolute())
    target = out / "checkpoint"
    shutil.rmtree(target, ignore_errors=True)
    return str(Path(result_checkpoint.to_directory(str(target))).absolute())


def run_train(run: Run) -> dict[str, Any]:
    from ray_pipeline.train.checkpoint import export_merged
    from ray_pipeline.train.plots import plot_loss_curve

    started = time.perf_counter()
    train, seed = run.cfg.train, run.cfg.run.seed
    out = run.stage_dir("train")
    prepared = prepare(run, out)
    key = resume_key(run, prepared)
    resuming = open_storage(run, key)
    train_rows = prepared.train_rows(train.data_fraction, seed)
    mode = data_loading_mode(
        train, prepared.dataset_bytes, train.num_workers * train.cpus_per_worker
    )
    data_started = time.perf_counter()
    datasets = make_datasets(prepared, train, fraction=train.data_fraction, seed=seed, mode=mode)
    data_seconds = time.perf_counter() - data_started
    storage_path, name = _storage(run)
    trainer = make_trainer(
        prepared,
        train,
        datasets,
        train_rows,
        num_workers=train.num_workers,
        storage_path=storage_path,
        name=name,
        seed=seed,
    )
    fit_started = time.perf_counter()
    result = trainer.fit()
    fit_seconds = time.perf_counter() - fit_started
    fs, root = _filesystem(storage_path)
    _write_marker(fs, f"{root}/{name}/{RESUME_FILE}", key, finished=True)
    final = result.metrics
    checkpoint = local_checkpoint(result.checkpoint, out)
    threshold = set_threshold(checkpoint, prepared.val_examples, run.cfg)
    merged = str(export_merged(checkpoint)) if train.export_merged else None
    history, step_log = final["history"], final["step_log"]
    plot = plot_loss_curve(
        history,
        step_log,
        out / "loss.png",
        f"{run.run_id}: {train.method} on {Path(prepared.base_model).name}",
    )
    section = {
        "checkpoint": checkpoint,
        "merged": merged,
        "kind": train.student.kind,
        "metrics": {
            **summary_metrics(final),
            "fit_seconds": round(fit_seconds, 2),
            "data_seconds": round(data_seconds, 2),
        },
        "threshold": threshold,
        "data_loading": mode,
        "resumed": resuming,
        "workers": train.num_workers,
        "use_gpu": train.use_gpu,
        "zero_stage": train.deepspeed.zero_stage if train.deepspeed.enabled else None,
        "method": train.method,
        "distill": {
            **train.distill.model_dump(),
            "rows_with_teacher_logprobs": prepared.lineage["rows_with_teacher_logprobs"],
        },
        "peak_learning_rate": train.peak_learning_rate,
        "effective_batch": train.effective_batch,
        "model": prepared.base_model,
        "manifest": prepared.lineage["manifest"],
        "history": history,
        "step_log": step_log,
        "plot": str(plot),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("train: %s; checkpoint %s", section["metrics"], section["checkpoint"])
    return section
