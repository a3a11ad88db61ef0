"""The DeepSpeed config for a TrainSection: ZeRO stage, offload, precision, clipping, batch.

A pure function of the config and the world size, so every combination is unit-tested on a
machine without GPUs, and switching ZeRO stage, offload or precision is a config change.

A user JSON file (``deepspeed.config_file``) is laid over the result, for the options we do
not generate.

Named deepspeed_config (not deepspeed) so it never shadows the `deepspeed` package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray_pipeline.config import TrainSection


def build_deepspeed_config(train: TrainSection, world_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON config for `train` on `world_size` workers.

    Without optimizer offload the training loop passes its own torch AdamW (no op to compile,
    works on CPU and GPU), which DeepSpeed accepts under ZeRO only with
    ``zero_allow_untested_optimizer``. With offload the config names the optimizer instead, so
    DeepSpeed builds its CPU Adam, the one meant to run next to offloaded state.
    """
    ds = train.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        # Overlap gradient reduction with the backward pass; contiguous buffers avoid
        # fragmentation. Both are DeepSpeed's recommended settings for stages 2 and 3.
        zero.update(overlap_comm=train.use_gpu, contiguous_gradients=True)
    if ds.zero_stage == 3:
        # Save full (gathered) 16-bit weights with the model, not only each rank's shard.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # Progress is logged by our loop; DeepSpeed's own prints would interleave with it.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        # Dynamic loss scaling (loss_scale 0): fp16 gradients underflow without it.
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    if ds.offload_optimizer:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": train.peak_learning_rate,
                "weight_decay": train.weight_decay,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
            },
        }
    if ds.config_file is not None:
        # The user's file wins key by key; nested objects (zero_optimization, ...) merge.
        config = merge_config(config, json.loads(Path(ds.config_file).read_text()))
    return config


def merge_config(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` laid over it: a key of both that holds an object in both merges
    recursively; any other key of `override` replaces the base's value."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out
