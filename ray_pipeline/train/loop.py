"""The Ray Train worker function: small helpers for setup, one step, evaluation, and
report + checkpoint, run on every worker.

Each worker gets an equal share of the rows (Ray Data's streaming_split with equal=True), so
every rank runs the same number of steps; DeepSpeed's collectives (and ZeRO-3's forward pass,
which gathers weights) need that. Metrics are all-reduced, so rank 0's report (the one Ray
keeps) describes all workers.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ray.data.collate_fn import NumpyBatchCollateFn

from ray_pipeline.config import TrainSection
from ray_pipeline.train.data import IGNORE_INDEX, length_grouped_batches, pad_batch

log = logging.getLogger("distill.train")

CHECKPOINT_DIR_NAME = "checkpoint"  # <storage>/<run name>/checkpoint/


class PadCollate(NumpyBatchCollateFn):
    """Ray Data collate: a batch of tokenized examples -> right-padded tensors."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return pad_batch(batch["input_ids"], batch["labels"], self.pad_id)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine") -> float:
    """Linear warm-up from 0 over `warmup_steps`, then a cosine or linear decay to 0 at
    `total_steps` (transformers' get_cosine_schedule_with_warmup / ..._linear_...)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {schedule!r}: expected cosine or linear")


def schedule_steps(train: TrainSection, train_rows: int, world_size: int) -> int:
    """Optimizer steps the run will take: each worker sees train_rows // world_size rows
    an epoch (equal split), in micro-batches of batch_size, gradient_accumulation_steps of
    which make one step; capped by max_steps."""
    micro_per_epoch = math.ceil((train_rows // world_size) / train.batch_size)
    steps = max(1, micro_per_epoch * train.epochs // train.gradient_accumulation_steps)
    return min(steps, train.max_steps) if train.max_steps else steps


# ------------------------------------------------------------------------------ setup
def _setup_process(train: TrainSection) -> None:
    """Per-process settings that must precede importing deepspeed / first torch use."""
    import torch

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    log.setLevel(logging.INFO)
    if not train.use_gpu:
        # Ray gives each worker cpus_per_worker CPUs; more torch threads only fight each other.
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))
        # Otherwise DeepSpeed probes for accelerators (and warns) before settling on CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if train.deepspeed.enabled:
        import deepspeed  # noqa: F401  (loads deepspeed.comm, patched below)

        if not train.use_gpu:
            # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op on first use (~20 s
            # of g++ per fresh machine). Without it DeepSpeed uses the gloo process group Ray
            # Train set up, which is all a CPU run needs. (`import deepspeed.comm.torch as m`
            # would give PyTorch itself: deepspeed.comm re-exports torch under that name.)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


@dataclass
class Job:
    """What the driver sends to every worker (see ``ray_pipeline.train.stage.worker_config``)."""

    train: TrainSection
    model_source: str  # directory or hub id the weights are loaded from
    tokenizer_dir: str
    base_dir: str | None  # copied into the checkpoint as base/ (LoRA on the tiny student)
    pad_id: int
    total_steps: int  # optimizer steps of the whole run (for the LR schedule)
    seed: int
    train_rows: int
    val_rows: int
    meta: dict[str, Any] = field(default_factory=dict)  # static part of distill_checkpoint.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Job:
        return cls(**{**config, "train": TrainSection.model_validate(config["train"])})


def _load_model(job: Job, ds_config: dict[str, Any] | None) -> Any:
    """The model to train (LoRA applied), on CPU. Under ZeRO-3 it is loaded already
    partitioned (HfDeepSpeedConfig makes from_pretrained use deepspeed.zero.Init), so no rank
    ever holds the whole model."""
    import torch

    from ray_pipeline.train.model import apply_lora, load_pretrained, weights_dtype

    train = job.train
    torch.manual_seed(job.seed)  # LoRA init: the same on every rank
    keep_alive = None
    if ds_config is not None and train.deepspeed.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # transformers (and PEFT, copying modules_to_save) see ZeRO-3 through a weakref to
        # this object: it must live until the model is built.
        keep_alive = HfDeepSpeedConfig(ds_config)
    kind = train.student.kind
    model = load_pretrained(
        job.model_source, weights_dtype(train), kind, job.meta.get("labels"), job.pad_id
    )
    if train.method == "lora":
        model = apply_lora(model, train.lora, kind)
    del keep_alive
    return model


def _optimizer_and_schedule(model: Any, job: Job) -> tuple[Any, Any]:
    import torch

    train = job.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    warmup = round(train.warmup_ratio * job.total_steps)

    def schedule(opt: Any) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, job.total_steps, warmup, train.schedule)
        )

    return optimizer, schedule


class DeepSpeedEngine:
    """Training through a DeepSpeed engine (ZeRO, precision, clipping, accumulation)."""

    def __init__(self, model: Any, job: Job, ds_config: dict[str, Any]):
        import deepspeed

        optimizer, schedule = _optimizer_and_schedule(model, job)
        # With optimizer offload the config names DeepSpeed's CPU Adam; else ours is used.
        client_optimizer = None if "optimizer" in ds_config else optimizer
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=client_optimizer,
            lr_scheduler=schedule,
            config=ds_config,
        )
        self.zero3 = job.train.deepspeed.zero_stage == 3
        self.device = self.engine.device

    @property
    def module(self) -> Any:
        return self.engine.module

    def set_train(self, mode: bool) -> None:
        self.engine.train(mode)

    def train_step(self, batch: dict[str, Any]) -> tuple[Any, bool]:
        """Forward + backward of one micro-batch; returns (loss, whether the optimizer stepped)."""
        loss = self.engine(**batch).loss
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        stepped = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()  # only updates weights (and the schedule) on a boundary
        return loss.detach(), stepped

    def eval_loss(self, batch: dict[str, Any]) -> Any:
        return self.engine(**batch).loss.detach()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class TorchEngine:
    """Training with plain torch (DDP across workers when there are several), for
    deepspeed.enabled: false. Mixed precision through autocast (+ loss scaling for fp16)."""

    def __init__(self, model: Any, job: Job):
        import ray.train.torch
        import torch

        self.train_cfg = job.train
        self.model = ray.train.torch.prepare_model(model)  # to the device; DDP when world > 1
        self.device = ray.train.torch.get_device()
        self.optimizer, schedule = _optimizer_and_schedule(model, job)
        self.scheduler = schedule(self.optimizer)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            self.train_cfg.precision
        )
        self.scaler = (
            torch.amp.GradScaler(self.device.type) if self.train_cfg.precision == "fp16" else None
        )
        self.zero3 = False
        self.micro_steps = 0

    @property
    def module(self) -> Any:
        return getattr(self.model, "module", self.model)

    def set_train(self, mode: bool) -> None:
        self.model.train(mode)

    def _autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, batch: dict[str, Any]) -> tuple[Any, bool]:
        import torch

        self.micro_steps += 1
        accumulate = self.train_cfg.gradient_accumulation_steps
        boundary = self.micro_steps % accumulate == 0
        # Between boundaries DDP need not all-reduce gradients: they are only summed locally.
        sync = (
            contextlib.nullcontext()
            if boundary or not hasattr(self.model, "no_sync")
            else self.model.no_sync()
        )
        with sync:
            with self._autocast():
                loss = self.model(**batch).loss
            scaled = loss / accumulate
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        if boundary:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            if self.train_cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(
                    self.module.parameters(), self.train_cfg.max_grad_norm
                )
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), boundary

    def eval_loss(self, batch: dict[str, Any]) -> Any:
        with self._autocast():
            return self.model(**batch).loss.detach()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


def _setup_engine(job: Job, world_size: int, rank: int) -> DeepSpeedEngine | TorchEngine:
    from ray_pipeline.train.deepspeed_config import build_deepspeed_config
    from ray_pipeline.train.model import count_parameters

    train = job.train
    if train.deepspeed.enabled:
        import deepspeed

        # Wraps the process group Ray Train created (gloo on CPU, nccl on GPU).
        deepspeed.init_distributed(dist_backend="nccl" if train.use_gpu else "gloo")
        ds_config = build_deepspeed_config(train, world_size)
        model = _load_model(job, ds_config)
        engine: DeepSpeedEngine | TorchEngine = DeepSpeedEngine(model, job, ds_config)
    else:
        model = _load_model(job, None)
        engine = TorchEngine(model, job)
    if rank == 0:
        trainable, total = count_parameters(engine.module)
        log.info(
            "model %s (%s) on %d workers: %s of %s parameters trainable",
            job.meta.get("base_model"),
            train.method,
            world_size,
            f"{trainable:,}",
            f"{total:,}",
        )
    return engine


# ------------------------------------------------------------------------- metrics
def _all_reduce_sum(values: list[float], device: Any) -> list[float]:
    """Element-wise sum over all workers (identity on a single worker)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _batch_counts(batch: dict[str, Any]) -> tuple[int, int, int]:
    """(examples, non-pad tokens, loss targets) of a batch, counted on the CPU copy (no device
    sync). A causal LM's targets are the labels after the causal shift (HF drops each
    sequence's first label), i.e. what the loss averages over; a classifier's, its examples."""
    examples = int(batch["input_ids"].shape[0])
    tokens = int(batch["attention_mask"].sum())
    labels = batch["labels"]
    target = examples if labels.dim() == 1 else int((labels[:, 1:] != IGNORE_INDEX).sum())
    return examples, tokens, target


def _pick(values: list[Any], index: list[int]) -> Any:
    """values[index] as a 1-D object array (np.array would make rows of equal length 2-D)."""
    import numpy as np

    out = np.empty(len(index), dtype=object)
    for j, i in enumerate(index):
        out[j] = values[i]
    return out


# Length grouping sorts windows of this many batches: wide enough that neighbours in length
# are found, narrow enough that an epoch's order stays random.
GROUP_WINDOW_BATCHES = 16


def _batches(
    shard: Any,
    collate: PadCollate,
    batch_size: int,
    device: Any,
    group_seed: int | None = None,
    **shuffle: Any,
) -> Iterator[tuple[dict[str, Any], tuple[int, int, int]]]:
    """(batch on device, its counts) from a worker's dataset shard. With a `group_seed`, each
    window of GROUP_WINDOW_BATCHES batches is cut into batches of similar length
    (``data.length_grouped_batches``): the same examples, far less padding."""
    if group_seed is None:
        for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate, **shuffle):
            counts = _batch_counts(batch)
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}, counts
        return

    rng = random.Random(group_seed)
    window_rows = batch_size * GROUP_WINDOW_BATCHES

    def grouped(rows: dict[str, list]) -> Iterator[tuple[dict[str, Any], tuple[int, int, int]]]:
        lengths = [len(ids) for ids in rows["input_ids"]]
        for index in length_grouped_batches(lengths, batch_size, rng):
            batch = collate({k: _pick(v, index) for k, v in rows.items()})
            yield (
                {k: v.to(device, non_blocking=True) for k, v in batch.items()},
                _batch_counts(batch),
            )

    # Whole windows give only full batches; the rest comes last: every worker makes exactly
    # ceil(rows / batch_size) batches, as schedule_steps planned (DDP and DeepSpeed need the
    # same number of steps on every rank), however the shard's batches arrive.
    buffer: dict[str, list] = {}
    for part in shard.iter_batches(batch_size=batch_size, batch_format="numpy", **shuffle):
        for k, v in part.items():
            buffer.setdefault(k, []).extend(v)
        if len(buffer["input_ids"]) >= window_rows:
            yield from grouped({k: v[:window_rows] for k, v in buffer.items()})
            buffer = {k: v[window_rows:] for k, v in buffer.items()}
    if buffer.get("input_ids"):
        yield from grouped(buffer)


# ---------------------------------------------------------------------- train / eval
def _evaluate(
    engine: DeepSpeedEngine | TorchEngine, shard: Any, collate: PadCollate, batch_size: int
) -> float | None:
    """Validation loss per target token over every worker's shard (None without val rows)."""
    import torch

    engine.set_train(False)
    loss_sum, tokens = torch.zeros((), dtype=torch.float64, device=engine.device), 0
    with torch.no_grad():
        for batch, (_, _, n) in _batches(shard, collate, batch_size, engine.device):
            loss_sum += engine.eval_loss(batch).double() * n
            tokens += n
    engine.set_train(True)
    total_loss, total_tokens = _all_reduce_sum([float(loss_sum), tokens], engine.device)
    return total_loss / total_tokens if total_tokens else None


@dataclass
class Progress:
    """Counters over the whole run (this worker's share; totals are all-reduced at reports)."""

    steps: int = 0  # optimizer steps (the same on every worker)
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _train_epoch(
    engine: DeepSpeedEngine | TorchEngine,
    shard: Any,
    collate: PadCollate,
    job: Job,
    epoch: int,
    progress: Progress,
    rank: int,
) -> dict[str, Any]:
    """One pass over this worker's shard (or until max_steps); returns the epoch's metrics,
    summed over all workers."""
    import torch

    train = job.train
    engine.set_train(True)
    started = window_start = time.perf_counter()
    # Losses are summed on the device and read back only when logged: reading one per step
    # would stall a GPU on every step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    window_loss = torch.zeros_like(loss_sum)
    examples = tokens = target = window_n = window_examples = 0
    batches = _batches(
        shard,
        collate,
        train.batch_size,
        engine.device,
        group_seed=(job.seed * 1_000_003 + epoch * 1009 + rank) if train.group_by_length else None,
        # Each epoch (and worker) sees its rows in a different, reproducible order.
        local_shuffle_buffer_size=train.batch_size * 8,
        local_shuffle_seed=job.seed * 1_000_003 + epoch * 1009 + rank,
    )
    for batch, (n_ex, n_tok, n_target) in batches:
        loss, stepped = engine.train_step(batch)
        weighted = loss.double() * n_target
        loss_sum += weighted
        window_loss += weighted
        examples, tokens, target = examples + n_ex, tokens + n_tok, target + n_target
        window_n, window_examples = window_n + n_target, window_examples + n_ex
        if not stepped:
            continue
        progress.steps += 1
        if rank == 0 and progress.steps % train.log_every_steps == 0:
            elapsed = time.perf_counter() - window_start
            log.info(
                "epoch %d step %d/%d loss %.4f lr %.2e examples/s %.1f (this worker)",
                epoch + 1,
                progress.steps,
                job.total_steps,
                float(window_loss) / max(window_n, 1),
                engine.lr(),
                window_examples / max(elapsed, 1e-9),
            )
            window_loss.zero_()
            window_n, window_examples, window_start = 0, 0, time.perf_counter()
        if train.max_steps and progress.steps >= train.max_steps:
            break
    seconds = time.perf_counter() - started
    loss_sum, examples, tokens, target = _all_reduce_sum(
        [float(loss_sum), examples, tokens, target], engine.device
    )
    progress.examples += int(examples)
    progress.tokens += int(tokens)
    progress.target_tokens += int(target)
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / target if target else None,
        "steps": progress.steps,
        "examples": int(examples),
        "epoch_seconds": round(seconds, 3),
        "examples_per_s": round(examples / seconds, 2) if seconds else None,
        "lr": engine.lr(),
    }


def _save_checkpoint(
    engine: DeepSpeedEngine | TorchEngine,
    job: Job,
    metrics: dict[str, Any],
    rank: int,
    out_dir: str,
) -> None:
    """Write the checkpoint directory on rank 0; under ZeRO-3 every rank takes part in
    gathering the weights."""
    from transformers import AutoTokenizer

    from ray_pipeline.train.checkpoint import gathered_state_dict, save_checkpoint

    train = job.train
    state = gathered_state_dict(
        engine.module, trainable_only=train.method == "lora", zero3=engine.zero3, writer=rank == 0
    )
    if rank != 0:
        return
    save_checkpoint(
        out_dir,
        model=engine.module,
        state_dict=state,
        tokenizer=AutoTokenizer.from_pretrained(job.tokenizer_dir),
        method=train.method,
        meta={**job.meta, "metrics": metrics},
        base_dir=job.base_dir if train.method == "lora" else None,
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=...)``)."""
    import ray.train

    job = Job.from_config(config)
    _setup_process(job.train)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    engine = _setup_engine(job, world, rank)
    collate = PadCollate(job.pad_id)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if job.val_rows else None
    progress = Progress()
    for epoch in range(job.train.epochs):
        metrics = _train_epoch(engine, train_shard, collate, job, epoch, progress, rank)
        metrics["val_loss"] = (
            _evaluate(engine, val_shard, collate, job.train.batch_size) if val_shard else None
        )
        metrics.update(tokens=progress.tokens, target_tokens=progress.target_tokens)
        progress.history.append(metrics)
        if rank == 0:
            log.info(
                "epoch %d done: train_loss %.4f val_loss %s steps %d examples/s %s",
                metrics["epoch"],
                metrics["train_loss"],
                "n/a" if metrics["val_loss"] is None else f"{metrics['val_loss']:.4f}",
                metrics["steps"],
                metrics["examples_per_s"],
            )
        last = epoch == job.train.epochs - 1 or bool(
            job.train.max_steps and progress.steps >= job.train.max_steps
        )
        if not last:
            ray.train.report(metrics)
            continue
        final = {
            **metrics,
            "epochs": epoch + 1,
            "train_rows": job.train_rows,
            "val_rows": job.val_rows,
            "examples_seen": progress.examples,
            "history": progress.history,
        }
        with tempfile.TemporaryDirectory(prefix="distill-ckpt-") as tmp:
            _save_checkpoint(
                engine, job, {k: v for k, v in final.items() if k != "history"}, rank, tmp
            )
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
            ray.train.report(final, checkpoint=checkpoint, checkpoint_dir_name=CHECKPOINT_DIR_NAME)
        break
