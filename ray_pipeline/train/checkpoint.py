"""The student checkpoint: a plain, self-describing directory.

    distill_checkpoint.json   what it is: kind (causal_lm | classifier), base model, method,
                              lineage (manifest + dataset hash), task label key, labels and
                              prompt, task kind (label | generative) and output schema, the
                              train config, final metrics, and for a binary classifier its
                              decision threshold
    tokenizer/                save_pretrained of the tokenizer it was trained with
    model/                    method 'full': the whole model (save_pretrained)
    adapter/                  method 'lora': the PEFT adapter (+ modules_to_save)
    base/                     method 'lora' on the 'tiny' student: its random base weights,
                              which exist nowhere else; a hub base is referenced by id instead
    merged/                   method 'lora' with train.export_merged: the base with the
                              adapters merged in, loadable with plain transformers
    train_state/              what resuming training needs (optimizer, schedule, progress)

Under ZeRO-3 each rank holds only a shard of every weight, and ``state_dict()`` returns empty
placeholders: saving that silently writes an empty model. ``gathered_state_dict`` gathers each
weight in turn (all ranks must call it), so the saved files are complete.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

META_FILE = "distill_checkpoint.json"
FORMAT_VERSION = 1


def gathered_state_dict(
    model: Any, *, trainable_only: bool, zero3: bool, writer: bool
) -> dict[str, Any] | None:
    """CPU copies of the model's weights (only the trainable ones when `trainable_only`).

    With `zero3` this is a collective: every rank must call it, with the same model; one
    weight is gathered at a time, so no rank ever holds more than the largest weight on top of
    its shard. Only the `writer` rank keeps the copies (the others get None).
    """
    gather = _zero3_gather if zero3 else _no_gather
    out: dict[str, Any] = {}
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        with gather(param):
            if writer:
                out[name] = param.detach().to("cpu", copy=True)
    if not trainable_only and writer:
        # Persistent buffers (those in state_dict) are never partitioned by ZeRO, and
        # save_pretrained expects them.
        buffers = {name for name, _ in model.named_buffers()}
        for name, value in model.state_dict().items():
            if name in buffers:
                out[name] = value.detach().to("cpu", copy=True)
    return out if writer else None


def _zero3_gather(param: Any) -> contextlib.AbstractContextManager:
    import deepspeed

    # modifier_rank=None: read-only gather, nothing is scattered back on exit.
    return deepspeed.zero.GatheredParameters([param], modifier_rank=None)


def _no_gather(param: Any) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def save_checkpoint(
    out_dir: str | Path,
    *,
    model: Any,
    state_dict: dict[str, Any],
    tokenizer: Any,
    method: str,
    meta: dict[str, Any],
    base_dir: str | Path | None = None,
) -> Path:
    """Write a checkpoint directory from an *unwrapped* model (no DDP / DeepSpeed wrapper)
    and a complete state dict (see ``gathered_state_dict``).

    `base_dir`: for LoRA on a base that cannot be re-downloaded (the tiny student), the saved
    base model to copy into base/.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / "tokenizer")
    if method == "full":
        model.save_pretrained(out / "model", state_dict=state_dict)
    elif method == "lora":
        # PEFT keeps only the adapter and modules_to_save entries of the state dict.
        model.save_pretrained(out / "adapter", state_dict=state_dict)
        if base_dir is not None:
            shutil.copytree(base_dir, out / "base", dirs_exist_ok=True)
    else:
        raise ValueError(f"unknown method {method!r}; expected 'lora' or 'full'")
    (out / META_FILE).write_text(
        json.dumps(
            {"format_version": FORMAT_VERSION, **meta, "method": method}, indent=2, default=str
        )
    )
    return out


def read_meta(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir} is not a student checkpoint: it has no {META_FILE}"
        )
    return json.loads(path.read_text())


def load_model(checkpoint_dir: str | Path, meta: dict[str, Any], *, merge: bool = True) -> Any:
    """The checkpoint's model (on CPU, in the dtype it was saved in). LoRA adapters are merged
    into the base weights when `merge` (faster inference, same outputs up to rounding)."""
    from ray_pipeline.train.model import CAUSAL_LM, load_pretrained

    ckpt = Path(checkpoint_dir)
    kind = meta.get("kind", CAUSAL_LM)
    labels, pad_id = meta.get("labels"), meta.get("pad_id")
    if meta["method"] == "full":
        model = load_pretrained(str(ckpt / "model"), "auto", kind, labels, pad_id)
        # Training switches the key/value cache off (and save_pretrained keeps that);
        # generation needs it back.
        model.config.use_cache = True
        return model
    from peft import PeftModel

    base_source = ckpt / "base" if (ckpt / "base").is_dir() else meta["base_model"]
    # A classifier base gets a new head here; the trained one comes with the adapter.
    base = load_pretrained(str(base_source), "auto", kind, labels, pad_id)
    model = PeftModel.from_pretrained(base, ckpt / "adapter")
    return model.merge_and_unload() if merge else model


def update_meta(checkpoint_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Add fields to a checkpoint's distill_checkpoint.json (e.g. the chosen threshold)."""
    meta = {**read_meta(checkpoint_dir), **fields}
    (Path(checkpoint_dir) / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return meta


MERGED_DIR = "merged"


def export_merged(checkpoint_dir: str | Path) -> Path:
    """Write merged/: the LoRA checkpoint's base with its adapters merged in (fp32 base, even
    when it was trained quantized), with the tokenizer, loadable by
    ``AutoModelFor*.from_pretrained`` without peft."""
    from transformers import AutoTokenizer

    ckpt = Path(checkpoint_dir)
    meta = read_meta(ckpt)
    if meta["method"] != "lora":
        raise ValueError(f"{ckpt} is a {meta['method']!r} checkpoint: only LoRA adapters merge")
    out = ckpt / MERGED_DIR
    model = load_model(ckpt, meta, merge=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(ckpt / "tokenizer").save_pretrained(out)
    return out
