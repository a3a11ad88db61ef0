"""Training throughput of the train stage on a small causal LM, beside a plain loop.

Prints one JSON object. Everything is measured in one run, side by side (the machines are
noisy, ratios are what count), on the comment texts of
``../shared/data/jigsaw/train.E.gpt-4.responses.csv`` with the toxicity prompt, a Llama-style
causal LM built from a config (``--hidden``, ``--layers``) and its tokenizer made from the
comments (no download):

* ``ours_tokens_per_s``: ``distill train`` (``run_train``: Ray Data read + tokenize, a
  TorchTrainer with one worker of 1 CPU, plain torch), real (non-padding) tokens per second
  over the logged steps after the first window (warm-up);
* ``plain_tokens_per_s``: a plain PyTorch/transformers loop in this process, 1 thread, the
  same model, weights, batch size, padding, optimizer and number of steps, timed the same way;
* ``ratio``: ours over plain;
* ``packing_speedup``: our tokens/s with ``train.packing`` over padding each batch to its
  longest (the same examples per step: packing computes fewer padded positions);
  ``grouping_speedup``: the same for ``group_by_length``;
* ``zero``: tokens/s with DeepSpeed ZeRO 0, 2 and 3 on 2 workers (1 CPU each);
* ``*_stage_s``: each run's whole ``run_train`` wall time (what a user waits for: Ray Train
  start, data, training, checkpoint), beside the steady-state rates.

GPU (bf16 tokens/s and MFU of a 0.5B-class model) is measured only where CUDA is present.

    python benchmarks/train_throughput.py              # 60 steps a run
    python benchmarks/train_throughput.py --steps 30 --skip-zero
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray_pipeline.config import load_config  # noqa: E402
from ray_pipeline.data.manifest import content_hash, write_manifest  # noqa: E402
from ray_pipeline.data.prompts import Prompt  # noqa: E402
from ray_pipeline.data.schema import dumps, new_row, row_id, to_table  # noqa: E402
from ray_pipeline.run_state import Run  # noqa: E402

CSV = ROOT.parent / "shared" / "data" / "jigsaw" / "train.E.gpt-4.responses.csv"
PROMPT = "Is this comment toxic? Answer in JSON with the key is_bad (0 or 1).\n\n%s"


def comments(limit: int) -> list[tuple[str, int]]:
    csv.field_size_limit(2**31 - 1)
    with CSV.open(newline="") as f:
        rows = [(r["comment_text"], int(r["is_bad"] == "True")) for r in csv.DictReader(f)]
    return rows[:limit]


def write_dataset(folder: Path, rows: list[tuple[str, int]]) -> None:
    """The comments as a curated dataset in the row schema (what the curate stage writes)."""
    prompt = Prompt(PROMPT, "%s")
    table = [
        new_row(
            id=row_id("bench", text),
            source="bench",
            input=text,
            messages=dumps(prompt.messages(text)),
            output=dumps({"is_bad": label}),
            label=str(label),
        )
        for text, label in rows
    ]
    import pyarrow.parquet as pq

    (folder / "dataset" / "train").mkdir(parents=True)
    pq.write_table(to_table(table), folder / "dataset" / "train" / "part-0.parquet")
    write_manifest(
        folder / "dataset" / "manifest.json",
        {"content_sha256": content_hash([(r["id"], r["label"]) for r in table])},
    )


def train_section(args: argparse.Namespace, **over) -> dict:
    return {
        "student": {
            "model": "tiny",
            "tiny": {
                "hidden_size": args.hidden,
                "num_layers": args.layers,
                "num_heads": 4,
                "intermediate_size": args.hidden * 2,
                "max_position_embeddings": args.max_seq_len,
                "vocab_size": 4096,
            },
        },
        "method": "full",
        "epochs": 1,
        "max_steps": args.steps,
        "learning_rate": 1e-3,
        "batch_size": args.batch_size,
        "max_seq_len": args.max_seq_len,
        "val_fraction": 0.0,
        "num_workers": 1,
        "cpus_per_worker": 1,
        "group_by_length": False,
        "log_every_steps": args.log_every,
        "deepspeed": {"enabled": False},
        **over,
    }


def ours(folder: Path, name: str, args: argparse.Namespace, **over) -> dict:
    """One run_train; its steady tokens/s (logged windows after the first) and wall time."""
    from ray_pipeline.train.stage import run_train

    run_dir = folder / name
    run_dir.mkdir()
    cfg = load_config(
        data={
            "run": {"seed": 0},
            "task": {
                "name": "toxicity",
                "prompt": {"template": PROMPT, "placeholder": "%s"},
                "label_key": "is_bad",
                "labels": ["0", "1"],
            },
            "teacher": {"simulator": {"enabled": True}},
            "data": {"logs": [{"path": "unused.jsonl"}]},
            "train": train_section(args, **over),
        }
    )
    # Every run reads the one curated dataset, where the run folder keeps it.
    (run_dir / "dataset").symlink_to(folder / "dataset", target_is_directory=True)
    (run_dir / "report.json").write_text(
        json.dumps({"curate": {"outputs": {"train": str(run_dir / "dataset" / "train")}}})
    )
    started = time.perf_counter()
    section = run_train(Run(cfg=cfg, run_id=name, dir=run_dir))
    wall = time.perf_counter() - started
    steady = section["step_log"][1:]
    return {
        "tokens_per_s": round(
            sum(e["tokens"] for e in steady) / sum(e["seconds"] for e in steady), 1
        ),
        "token_efficiency": round(
            sum(e["tokens"] for e in steady)
            / sum(e["tokens"] / e["token_efficiency"] for e in steady),
            3,
        ),
        "steps": section["metrics"]["steps"],
        "stage_s": round(wall, 2),
        "checkpoint": section["checkpoint"],
    }


def plain(folder: Path, run_name: str, args: argparse.Namespace) -> dict:
    """The same training in a plain loop: the tiny model and tokenizer our run made (same
    weights), the same tokenized examples, random batches padded to their longest, AdamW
    with the same schedule shape, 1 torch thread."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_pipeline.train.data import encode_examples, load_examples, pad_batch

    torch.set_num_threads(1)
    out = folder / run_name / "train"
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(out / "student_base")
    model.config.use_cache = False
    examples = load_examples(folder / "dataset" / "train", "canonical")
    encoded = encode_examples(tokenizer, examples, args.max_seq_len)
    random.Random(0).shuffle(encoded)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / args.steps)
    model.train()
    tokens = 0
    started = None
    b = args.batch_size
    for step in range(args.steps):
        if step == args.log_every:  # the same warm-up window ours leaves out
            tokens, started = 0, time.perf_counter()
        rows = encoded[step * b : (step + 1) * b]
        batch = pad_batch(
            [r["input_ids"] for r in rows], [r["labels"] for r in rows], tokenizer.pad_token_id
        )
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += sum(len(r["input_ids"]) for r in rows)
    seconds = time.perf_counter() - started
    return {"tokens_per_s": round(tokens / seconds, 1), "steps": args.steps}


# A 0.5B-class decoder (about 0.47B parameters with its 32k vocabulary), built from a config:
# Qwen2.5-0.5B / Llama-style shapes, no download.
GPU_MODEL = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "intermediate_size": 4096,
    "vocab_size": 32000,
}
# Dense bf16 peak of one GPU, TFLOP/s (the vendors' figures without sparsity), by name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def gpu_model_dir(folder: Path, args: argparse.Namespace) -> tuple[Path, int]:
    """Save the 0.5B-class model (random weights) with a tokenizer of its vocabulary made from
    the comments into `folder`/gpu_model; returns it and its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ray_pipeline.train.tokenizer import build_tiny_tokenizer

    texts = [t for t, _ in comments(args.rows)] + [PROMPT, '{"is_bad": 0}', '{"is_bad": 1}']
    tokenizer = build_tiny_tokenizer(texts, GPU_MODEL["vocab_size"])
    config = LlamaConfig(
        **{**GPU_MODEL, "vocab_size": len(tokenizer)},
        max_position_embeddings=args.max_seq_len,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = folder / "gpu_model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def gpu_figures(folder: Path, args: argparse.Namespace) -> dict | None:
    """bf16 tokens/s of our trainer (1 worker, 1 GPU, full fine-tuning, packed batches) on the
    0.5B-class model, and its model FLOPs utilisation: 6 x parameters x tokens/s (forward and
    backward of every weight per real token; attention's own FLOPs are left out, as in the
    usual estimate) over the GPU's dense bf16 peak. None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    model_dir, params = gpu_model_dir(folder, args)
    name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or next(
        (v for k, v in PEAK_BF16_TFLOPS.items() if k in name.upper()), None
    )
    run = ours(
        folder,
        "gpu_bf16",
        args,
        student={"model": str(model_dir)},
        use_gpu=True,
        precision="bf16",
        packing=True,
        batch_size=args.gpu_batch_size,
    )
    flops = 6 * params * run["tokens_per_s"]
    return {
        "device": name,
        "parameters": params,
        "bf16_tokens_per_s": run["tokens_per_s"],
        "model_tflops": round(flops / 1e12, 2),
        "peak_bf16_tflops": peak,
        "mfu": round(flops / (peak * 1e12), 3) if peak else None,
        "batch_size": args.gpu_batch_size,
        "stage_s": run["stage_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--skip-zero", action="store_true")
    parser.add_argument("--gpu-batch-size", type=int, default=32)
    parser.add_argument(
        "--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: by its name)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        folder = Path(tmp)
        rows = comments(args.rows)
        write_dataset(folder, rows)
        started = time.perf_counter()
        padded = ours(folder, "padded", args)
        plain_run = plain(folder, "padded", args)
        packed = ours(folder, "packed", args, packing=True)
        grouped = ours(folder, "grouped", args, group_by_length=True)
        zero = {}
        if not args.skip_zero:
            for stage in (0, 2, 3):
                zero[f"zero{stage}"] = ours(
                    folder,
                    f"zero{stage}",
                    args,
                    num_workers=2,
                    deepspeed={"enabled": True, "zero_stage": stage},
                )
        result = {
            "ours_tokens_per_s": padded["tokens_per_s"],
            "plain_tokens_per_s": plain_run["tokens_per_s"],
            "ratio": round(padded["tokens_per_s"] / plain_run["tokens_per_s"], 3),
            "packing_speedup": round(packed["tokens_per_s"] / padded["tokens_per_s"], 3),
            "grouping_speedup": round(grouped["tokens_per_s"] / padded["tokens_per_s"], 3),
            "token_efficiency": {
                "padded": padded["token_efficiency"],
                "packed": packed["token_efficiency"],
                "grouped": grouped["token_efficiency"],
            },
            "packed_tokens_per_s": packed["tokens_per_s"],
            "grouped_tokens_per_s": grouped["tokens_per_s"],
            "zero": {
                k: {"tokens_per_s": v["tokens_per_s"], "stage_s": v["stage_s"]}
                for k, v in zero.items()
            },
            "padded_stage_s": padded["stage_s"],
            "packed_stage_s": packed["stage_s"],
            "steps": args.steps,
            "batch_size": args.batch_size,
            "model": {
                "hidden": args.hidden,
                "layers": args.layers,
                "max_seq_len": args.max_seq_len,
            },
            "rows": len(rows),
            "gpu": gpu_figures(folder, args),
            "wall_s": round(time.perf_counter() - started, 1),
        }
    ray.shutdown()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
