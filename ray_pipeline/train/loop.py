"""The Ray Train worker function: small helpers for setup, one step, evaluation, and
report + checkpoint, run on every worker.

Each worker gets an equal share of the rows (Ray Data's streaming_split with equal=True), so
every rank runs the same number of steps; DeepSpeed's collectives (and ZeRO-3's forward pass,
which gathers weights) need that. Metrics are all-reduced, so rank 0's report (the one Ray
keeps) describes all workers.

Checkpoints (every train.checkpoint_every_steps optimizer steps and at every epoch's end) are
a complete student checkpoint plus ``train_state/``: the optimizer, schedule and progress
(epoch, micro-batches done in it, counters, history). A worker group restarted after a
failure, or a re-run of the stage, gets the newest one from ``ray.train.get_checkpoint()`` and
goes on from exactly that step: the epoch's first micro-batches are skipped, not trained again.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_pipeline import storage
from ray_pipeline.config import TrainSection
from ray_pipeline.train.data import BatchCounts, collate, length_grouped_batches

log = logging.getLogger("distill.train")

TRAIN_STATE_DIR = "train_state"  # inside every checkpoint: what resuming needs
PROGRESS_FILE = "progress.json"


def checkpoint_dir_name(step: int) -> str:
    """<storage>/<run name>/checkpoint_<step>/: sorted by name is sorted by step."""
    return f"checkpoint_{step:07d}"


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
    class_weights: list[float] | None = None  # per label (train.class_weights: balanced)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Job:
        return cls(**{**config, "train": TrainSection.model_validate(config["train"])})


def _load_model(job: Job, ds_config: dict[str, Any] | None) -> Any:
    """The model to train (LoRA applied), on CPU (on its GPU when quantized). Under ZeRO-3
    it is loaded already partitioned (HfDeepSpeedConfig makes from_pretrained use
    deepspeed.zero.Init), so no rank ever holds the whole model."""
    import torch

    from ray_pipeline.train.model import apply_lora, load_pretrained, quantization, weights_dtype

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
        storage.local_copy(job.model_source),
        weights_dtype(train),
        kind,
        job.meta.get("labels"),
        job.pad_id,
        quantization_config=quantization(train),
    )
    # No key/value cache in training: it is never reused, and transformers only keeps packed
    # examples apart (position ids restarting) when there is none.
    model.config.use_cache = False
    if train.lora.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    if train.method == "lora":
        model = apply_lora(model, train.lora, kind)
    del keep_alive
    return model


def _optimizer_and_schedule(model: Any, job: Job) -> tuple[Any, Any]:
    import torch

    train = job.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=train.peak_learning_rate, weight_decay=train.weight_decay
    )
    warmup = round(train.warmup_ratio * job.total_steps)

    def schedule(opt: Any) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, job.total_steps, warmup, train.schedule)
        )

    return optimizer, schedule


SOFT_KEYS = frozenset({"soft_probs", "soft_mask", "soft_ids", "soft_logprobs"})


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without its soft targets: what the model's forward takes."""
    return {k: v for k, v in batch.items() if k not in SOFT_KEYS}


def forward_loss(
    model: Any,
    batch: dict[str, Any],
    train: TrainSection,
    class_weights: list[float] | None = None,
) -> Any:
    """The training loss of a batch: the cross-entropy on the teacher's answer (for a
    classifier weighted per class and label-smoothed as configured), mixed with the
    divergence from the teacher's distribution when logit distillation is on
    ((1 - w) x CE + w x divergence, w = train.distill.weight)."""
    out = model(**model_inputs(batch))
    loss = out.loss
    if class_weights is not None or train.label_smoothing:
        import torch

        weight = (
            torch.tensor(class_weights, dtype=out.logits.dtype, device=out.logits.device)
            if class_weights is not None
            else None
        )
        loss = torch.nn.functional.cross_entropy(
            out.logits, batch["labels"], weight=weight, label_smoothing=train.label_smoothing
        )
    distill = train.distill
    if distill.weight == 0 or not SOFT_KEYS & batch.keys():
        return loss
    from ray_pipeline.train.soft_targets import class_soft_loss, soft_target_loss

    if "soft_probs" in batch:
        divergence = class_soft_loss(
            out.logits, batch["soft_probs"], batch["soft_mask"], distill.kind, distill.temperature
        )
    else:
        # The logits at position t are the student's distribution for token t + 1.
        ids, logprobs = batch["soft_ids"][:, 1:], batch["soft_logprobs"][:, 1:]
        where = ids[..., 0] >= 0
        divergence = soft_target_loss(
            out.logits[:, :-1][where],
            ids[where],
            logprobs[where],
            where[where],
            distill.kind,
            distill.temperature,
        )
    return (1 - distill.weight) * loss + distill.weight * divergence


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
        self.train_cfg = job.train
        self.class_weights = job.class_weights
        self.zero3 = job.train.deepspeed.zero_stage == 3
        self.device = self.engine.device
        self.grad_norm: float | None = None

    @property
    def module(self) -> Any:
        return self.engine.module

    def set_train(self, mode: bool) -> None:
        self.engine.train(mode)

    def train_step(self, batch: dict[str, Any]) -> tuple[Any, bool]:
        """Forward + backward of one micro-batch; returns (loss, whether the optimizer stepped)."""
        loss = forward_loss(self.engine, batch, self.train_cfg, self.class_weights)
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        stepped = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()  # only updates weights (and the schedule) on a boundary
        if stepped:
            norm = self.engine.get_global_grad_norm()
            self.grad_norm = None if norm is None else float(norm)
        return loss.detach(), stepped

    def eval_step(self, batch: dict[str, Any]) -> tuple[Any, Any]:
        """(loss, logits) of a validation batch."""
        out = self.engine(**model_inputs(batch))
        return out.loss.detach(), out.logits.detach()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, directory: Path) -> None:
        """Every rank writes its part (ZeRO shards optimizer state, ZeRO-3 the weights too):
        Ray Train merges the ranks' directories into one checkpoint."""
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state")

    def load_state(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state in {directory / 'deepspeed'}")


class TorchEngine:
    """Training with plain torch (DDP across workers when there are several), for
    deepspeed.enabled: false. Mixed precision through autocast (+ loss scaling for fp16)."""

    def __init__(self, model: Any, job: Job):
        import ray.train.torch
        import torch

        self.train_cfg = job.train
        self.class_weights = job.class_weights
        # to the device (a 4-bit model is placed when loaded and cannot be moved); DDP when
        # there are several workers.
        self.model = ray.train.torch.prepare_model(
            model, move_to_device=not job.train.lora.load_in_4bit
        )
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
        self.grad_norm: float | None = None

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
                loss = forward_loss(self.model, batch, self.train_cfg, self.class_weights)
            scaled = loss / accumulate
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        if boundary:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            # The norm is measured either way (an infinite limit clips nothing).
            limit = self.train_cfg.max_grad_norm or float("inf")
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), limit)
            self.grad_norm = norm
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), boundary

    def eval_step(self, batch: dict[str, Any]) -> tuple[Any, Any]:
        """(loss, logits) of a validation batch."""
        with self._autocast():
            out = self.model(**model_inputs(batch))
        return out.loss.detach(), out.logits.detach()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, directory: Path) -> None:
        """Rank 0 writes weights, optimizer, schedule and loss scale (DDP keeps every rank's
        copy identical)."""
        import ray.train
        import torch

        if ray.train.get_context().get_world_rank() != 0:
            return
        directory.mkdir(parents=True, exist_ok=True)
        trainable = {n for n, p in self.module.named_parameters() if p.requires_grad}
        state = {
            # Frozen weights never change: the student files (or the base) hold them.
            "model": {k: v for k, v in self.module.state_dict().items() if k in trainable},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "micro_steps": self.micro_steps,
        }
        torch.save(state, directory / "torch_engine.pt")

    def load_state(self, directory: Path) -> None:
        import torch

        state = torch.load(directory / "torch_engine.pt", map_location=self.device)
        missing = {n for n, p in self.module.named_parameters() if p.requires_grad} - set(
            state["model"]
        )
        if missing:
            raise ValueError(
                f"checkpoint {directory} does not match this model: it lacks "
                f"{len(missing)} trainable weight(s), e.g. {sorted(missing)[0]}"
            )
        self.module.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.micro_steps = state["micro_steps"]


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
            "model %s (%s) on %d workers: %s of %s parameters trainable; peak lr %.3g "
            "(effective batch %d)",
            job.meta.get("base_model"),
            train.method,
            world_size,
            f"{trainable:,}",
            f"{total:,}",
            train.peak_learning_rate,
            train.effective_batch,
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


def _pick(values: Any, index: list[int]) -> Any:
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
    batch_size: int,
    pad_id: int,
    device: Any,
    *,
    group_seed: int | None = None,
    pack_to: int | None = None,
    skip: int = 0,
    **shuffle: Any,
) -> Iterator[tuple[dict[str, Any] | None, BatchCounts | None]]:
    """(batch on device, its counts) from a worker's dataset shard, `batch_size` examples
    each; the first `skip` come as (None, None), not even collated (resuming mid-epoch).

    With a `group_seed`, each window of GROUP_WINDOW_BATCHES batches is cut into batches of
    similar length (``data.length_grouped_batches``): the same examples, far less padding.
    With `pack_to`, each batch's examples are packed into rows of that many tokens.
    Whole windows give only full batches and the rest comes last, so every worker makes
    exactly ceil(rows / batch_size) batches, as schedule_steps planned (DDP and DeepSpeed need
    the same number of steps on every rank), however the shard's batches arrive.
    """
    rng = random.Random(group_seed)
    window_rows = batch_size * (GROUP_WINDOW_BATCHES if group_seed is not None else 1)
    made = 0

    def cut(rows: dict[str, Any]) -> Iterator[tuple[dict[str, Any] | None, BatchCounts | None]]:
        nonlocal made
        n = len(rows["input_ids"])
        if group_seed is None:
            groups = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
        else:
            lengths = [len(ids) for ids in rows["input_ids"]]
            groups = length_grouped_batches(lengths, batch_size, rng)
        for index in groups:
            made += 1
            if made <= skip:
                yield None, None
                continue
            batch, counts = collate({k: _pick(v, index) for k, v in rows.items()}, pad_id, pack_to)
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}, counts

    buffer: dict[str, list] = {}
    for part in shard.iter_batches(batch_size=batch_size, batch_format="numpy", **shuffle):
        for k, v in part.items():
            buffer.setdefault(k, []).extend(v)
        if len(buffer["input_ids"]) >= window_rows:
            yield from cut({k: v[:window_rows] for k, v in buffer.items()})
            buffer = {k: v[window_rows:] for k, v in buffer.items()}
    if buffer.get("input_ids"):
        yield from cut(buffer)


# ---------------------------------------------------------------------- train / eval
def correct_classes(logits: Any, labels: Any) -> Any:
    """How many rows' highest-scoring class (argmax of a classifier's [rows, classes] logits)
    is the row's label (class index), as a 0-d tensor on the logits' device (read back once
    per validation pass, not per batch)."""
    return (logits.argmax(dim=-1) == labels).sum()


def _evaluate(
    engine: DeepSpeedEngine | TorchEngine, shard: Any | None, job: Job
) -> dict[str, float | None]:
    """Validation metrics over every worker's shard, in one pass: val_loss (per target token)
    and, for a classifier student, val_accuracy (the share of rows whose argmax class is their
    label). None where there are no validation rows."""
    import torch

    classifier = job.train.student.kind == "classifier"
    engine.set_train(False)
    loss_sum, targets = torch.zeros((), dtype=torch.float64, device=engine.device), 0
    correct, rows = torch.zeros((), dtype=torch.long, device=engine.device), 0
    with torch.no_grad():
        batches = (
            _batches(shard, job.train.batch_size, job.pad_id, engine.device)
            if shard is not None
            else []
        )
        for batch, counts in batches:
            loss, logits = engine.eval_step(batch)
            loss_sum += loss.double() * counts.targets
            targets += counts.targets
            if classifier:
                correct += correct_classes(logits, batch["labels"])
                rows += counts.examples
    engine.set_train(True)
    total_loss, total_targets, total_correct, total_rows = _all_reduce_sum(
        [float(loss_sum), targets, int(correct), rows], engine.device
    )
    metrics = {"val_loss": total_loss / total_targets if total_targets else None}
    if classifier:
        metrics["val_accuracy"] = total_correct / total_rows if total_rows else None
    return metrics


@dataclass
class Progress:
    """Where training stands, saved in every checkpoint. Counters are this worker's share
    until an epoch ends, then all workers' (all-reduced)."""

    steps: int = 0  # optimizer steps (the same on every worker)
    epoch: int = 0  # the epoch in progress (0-based)
    micro_batches: int = 0  # micro-batches of `epoch` already trained
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0  # examples cut at max_seq_len in the latest full epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per epoch
    step_log: list[dict[str, Any]] = field(default_factory=list)  # one per logged step
    resumed_from: list[int] = field(default_factory=list)  # steps this run resumed at

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Progress:
        return cls(**json.loads(text))


@dataclass
class Window:
    """Sums over the micro-batches since the last logged step."""

    started: float = field(default_factory=time.perf_counter)
    loss: float = 0.0
    targets: int = 0
    examples: int = 0
    tokens: int = 0
    positions: int = 0


def _log_step(
    engine: DeepSpeedEngine | TorchEngine,
    window: Window,
    loss_sum: Any,
    progress: Progress,
    job: Job,
    rank: int,
) -> dict[str, Any]:
    """All workers' loss and throughput over the window (a collective: every rank calls it at
    the same step), appended to progress.step_log and logged by rank 0."""
    seconds = time.perf_counter() - window.started
    loss, targets, examples, tokens, positions = _all_reduce_sum(
        [float(loss_sum), window.targets, window.examples, window.tokens, window.positions],
        engine.device,
    )
    entry = {
        "step": progress.steps,
        "epoch": progress.epoch + 1,
        "loss": loss / targets if targets else None,
        "lr": engine.lr(),
        "grad_norm": None if engine.grad_norm is None else float(engine.grad_norm),
        "seconds": round(seconds, 4),
        "tokens": int(tokens),
        "examples_per_s": round(examples / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        # Share of computed positions that are real tokens (the rest is padding).
        "token_efficiency": round(tokens / positions, 3) if positions else None,
    }
    progress.step_log.append(entry)
    if rank == 0:
        log.info(
            "epoch %d step %d/%d loss %.4f lr %.2e grad_norm %s tokens/s %.0f examples/s %.1f",
            entry["epoch"],
            entry["step"],
            job.total_steps,
            entry["loss"] if entry["loss"] is not None else float("nan"),
            entry["lr"],
            "n/a" if entry["grad_norm"] is None else f"{entry['grad_norm']:.3f}",
            entry["tokens_per_s"],
            entry["examples_per_s"],
        )
    return entry


def _train_epoch(
    engine: DeepSpeedEngine | TorchEngine,
    shard: Any,
    job: Job,
    progress: Progress,
    rank: int,
    checkpoint: Any,
) -> dict[str, Any]:
    """One pass over this worker's shard (or until max_steps), from progress.micro_batches on;
    calls `checkpoint()` every checkpoint_every_steps steps. Returns the epoch's metrics,
    summed over all workers."""
    import torch

    train = job.train
    epoch = progress.epoch
    engine.set_train(True)
    started = time.perf_counter()
    # Losses are summed on the device and read back only when logged: reading one per step
    # would stall a GPU on every step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    window_loss = torch.zeros_like(loss_sum)
    window = Window()
    examples = tokens = targets = truncated = 0
    seed = job.seed * 1_000_003 + epoch * 1009 + rank
    batches = _batches(
        shard,
        train.batch_size,
        job.pad_id,
        engine.device,
        group_seed=seed if train.group_by_length and not train.packing else None,
        pack_to=train.max_seq_len if train.packing else None,
        skip=progress.micro_batches,
        # Each epoch (and worker) sees its rows in a different, reproducible order.
        local_shuffle_buffer_size=train.batch_size * 8,
        local_shuffle_seed=seed,
    )
    due = False  # a checkpoint is due: taken before the next micro-batch, or at epoch end
    for batch, counts in batches:
        if batch is None or counts is None:
            continue  # trained before the checkpoint this run resumed from
        if due:
            checkpoint()
            due = False
        loss, stepped = engine.train_step(batch)
        progress.micro_batches += 1
        weighted = loss.double() * counts.targets
        loss_sum += weighted
        window_loss += weighted
        examples, tokens = examples + counts.examples, tokens + counts.tokens
        targets, truncated = targets + counts.targets, truncated + counts.truncated
        window.targets += counts.targets
        window.examples += counts.examples
        window.tokens += counts.tokens
        window.positions += counts.positions
        if not stepped:
            continue
        progress.steps += 1
        if progress.steps % train.log_every_steps == 0:
            _log_step(engine, window, window_loss, progress, job, rank)
            window_loss.zero_()
            window = Window()
        due = bool(train.checkpoint_every_steps) and (
            progress.steps % train.checkpoint_every_steps == 0
        )
        if train.max_steps and progress.steps >= train.max_steps:
            break
    seconds = time.perf_counter() - started
    loss_sum, examples, tokens, targets, truncated = _all_reduce_sum(
        [float(loss_sum), examples, tokens, targets, truncated], engine.device
    )
    progress.examples += int(examples)
    progress.tokens += int(tokens)
    progress.target_tokens += int(targets)
    # Skipped micro-batches (resuming) are not counted: the largest epoch's count is kept.
    progress.truncated = max(progress.truncated, int(truncated))
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / targets if targets else None,
        "steps": progress.steps,
        "examples": int(examples),
        "epoch_seconds": round(seconds, 3),
        "examples_per_s": round(examples / seconds, 2) if seconds else None,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "lr": engine.lr(),
    }


def _save_checkpoint(
    engine: DeepSpeedEngine | TorchEngine,
    job: Job,
    progress: Progress,
    metrics: dict[str, Any],
    rank: int,
    out_dir: Path,
) -> None:
    """The student (rank 0; under ZeRO-3 every rank takes part in gathering the weights) and
    the training state (every rank its part) into `out_dir`."""
    from transformers import AutoTokenizer

    from ray_pipeline.train.checkpoint import gathered_state_dict, save_checkpoint

    train = job.train
    state = gathered_state_dict(
        engine.module, trainable_only=train.method == "lora", zero3=engine.zero3, writer=rank == 0
    )
    engine.save_state(out_dir / TRAIN_STATE_DIR)
    if rank != 0:
        return
    (out_dir / TRAIN_STATE_DIR / PROGRESS_FILE).write_text(progress.to_json())
    save_checkpoint(
        out_dir,
        model=engine.module,
        state_dict=state,
        tokenizer=AutoTokenizer.from_pretrained(storage.local_copy(job.tokenizer_dir)),
        method=train.method,
        meta={
            **job.meta,
            "metrics": {k: v for k, v in metrics.items() if k not in ("history", "step_log")},
        },
        base_dir=(
            storage.local_copy(job.base_dir) if train.method == "lora" and job.base_dir else None
        ),
    )


def _report(
    engine: DeepSpeedEngine | TorchEngine,
    job: Job,
    progress: Progress,
    metrics: dict[str, Any],
    rank: int,
) -> None:
    """Checkpoint and report (every rank calls it at the same step). Every rank hands Ray its
    directory (DeepSpeed writes a part on each); Ray merges them into one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="distill-ckpt-") as tmp:
        _save_checkpoint(engine, job, progress, metrics, rank, Path(tmp))
        has_files = any(Path(tmp).iterdir())
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None,
            checkpoint_dir_name=checkpoint_dir_name(progress.steps),
        )


def _resume(engine: DeepSpeedEngine | TorchEngine, rank: int) -> Progress:
    """The progress (and engine state) of the newest checkpoint, or a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as directory:
        state = Path(directory) / TRAIN_STATE_DIR
        progress = Progress.from_json((state / PROGRESS_FILE).read_text())
        engine.load_state(state)
    progress.resumed_from.append(progress.steps)
    if rank == 0:
        log.info(
            "resuming from step %d (epoch %d, %d micro-batches into it)",
            progress.steps,
            progress.epoch + 1,
            progress.micro_batches,
        )
    return progress


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=...)``)."""
    import ray.train

    job = Job.from_config(config)
    train = job.train
    _setup_process(train)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    engine = _setup_engine(job, world, rank)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if job.val_rows else None
    progress = _resume(engine, rank)

    def step_checkpoint() -> None:
        _report(engine, job, progress, {"steps": progress.steps, "epoch": progress.epoch + 1}, rank)

    def done() -> bool:
        return progress.epoch >= train.epochs or bool(
            train.max_steps and progress.steps >= train.max_steps
        )

    while not done():
        metrics = _train_epoch(engine, train_shard, job, progress, rank, step_checkpoint)
        # val_loss always (None without validation rows); val_accuracy for a classifier.
        metrics.update(_evaluate(engine, val_shard, job))
        metrics.update(tokens=progress.tokens, target_tokens=progress.target_tokens)
        progress.history.append(metrics)
        progress.epoch += 1
        progress.micro_batches = 0
        if rank == 0:
            log.info(
                "epoch %d done: train_loss %s val_loss %s%s steps %d examples/s %s",
                metrics["epoch"],
                "n/a" if metrics["train_loss"] is None else f"{metrics['train_loss']:.4f}",
                "n/a" if metrics["val_loss"] is None else f"{metrics['val_loss']:.4f}",
                f" val_accuracy {metrics['val_accuracy']:.4f}"
                if metrics.get("val_accuracy") is not None
                else "",
                metrics["steps"],
                metrics["examples_per_s"],
            )
        final = {
            **metrics,
            "epochs": progress.epoch,
            "train_rows": job.train_rows,
            "val_rows": job.val_rows,
            "examples_seen": progress.examples,
            "truncated": progress.truncated,
            "resumed_from": progress.resumed_from,
            "finished": done(),
        }
        if done():
            final.update(history=progress.history, step_log=progress.step_log)
        # Epoch-end checkpoint: a restart after it goes on with the next epoch.
        _report(engine, job, progress, final, rank)
