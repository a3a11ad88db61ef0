"""Evaluate stage: the student, the teacher and naive baselines on fixed test sets.

For each configured test set, in one table: accuracy, balanced accuracy, per-class
precision/recall/F1, ROC-AUC (where a model gives probabilities) and the confusion matrix of
the student (greedy answers from the checkpoint, parsed like the teacher's), of the teacher
(called through the same pool as in generate, so recorded/cached answers are reused) and of
the baselines: the majority class of the curated labels, and TF-IDF + logistic regression
fitted on the student's own training rows. Every student mistake and every student/teacher
disagreement goes on the test set's mistakes page (HTML). Output: runs/<id>/evaluate/.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ray_pipeline.config import TaskSection
from ray_pipeline.data.schema import to_table
from ray_pipeline.data.test_sets import test_set_rows
from ray_pipeline.evaluate.metrics import TfidfBaseline, classification_metrics, majority_label
from ray_pipeline.evaluate.mistakes import ERROR, mistake_rows, write_mistakes_page
from ray_pipeline.run_state import Run
from ray_pipeline.teacher.caller import TeacherEndpoint
from ray_pipeline.teacher.parse import parse_batch, parse_rows
from ray_pipeline.teacher.quota import from_pico, to_pico
from ray_pipeline.teacher.session import TeacherSession

log = logging.getLogger("distill.evaluate")


class StudentPredictor:
    """Ray Data actor: the student's answers for a batch of rows, parsed into labels."""

    def __init__(self, checkpoint: str, task: TaskSection, max_new_tokens: int):
        from ray_pipeline.train.student import Student

        self.student = Student.load(checkpoint)
        self.task = task
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        answers = self.student.answer(
            [json.loads(r["messages"]) for r in rows], max_new_tokens=self.max_new_tokens
        )
        for row, a in zip(rows, answers, strict=True):
            scores = {"confidence": a.confidence, **({"probs": a.probs} if a.probs else {})}
            row.update(response=a.text, teacher="student", scores=json.dumps(scores))
        return to_table(parse_rows(rows, self.task))


def _by_test_set(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (r["source"], r["source_line"])):
        out.setdefault(r["source"], []).append(r)
    return out


def training_rows(run: Run) -> tuple[list[str], list[str]]:
    """(inputs, labels) of the rows the student trained on: the curated dataset without the
    validation rows (``train.data.in_split``), for the TF-IDF baseline."""
    from ray_pipeline.train.data import in_split

    dataset = run.require("curate")["outputs"]["train"]
    table = pq.read_table(dataset, columns=["id", "input", "label"]).to_pylist()
    rows = [
        r
        for r in table
        if r["label"] is not None and in_split(r["id"], "train", run.cfg.train.val_fraction)
    ]
    return [r["input"] or "" for r in rows], [r["label"] for r in rows]


def _confidence(row: dict[str, Any]) -> tuple[float | None, dict[str, float] | None]:
    scores = json.loads(row["scores"]) if row.get("scores") else {}
    return scores.get("confidence"), scores.get("probs")


def score_test_set(
    name: str,
    srows: list[dict[str, Any]],
    trows: list[dict[str, Any]],
    baselines: dict[str, tuple[list[str], list[dict[str, float]] | None]],
    labels: list[str],
    out: Path,
) -> dict[str, Any]:
    """Metrics of every model on one test set (student, teacher when scored, baselines), its
    mistakes page and files. `baselines`: name -> (labels, probabilities or None) per row."""
    gold = [r["gold"] for r in srows]
    confidences = [_confidence(r) for r in srows]
    student_probs = [p for _, p in confidences]
    scored: dict[str, tuple[list[str | None], list[dict[str, float]] | None]] = {
        "student": (
            [r["label"] for r in srows],
            student_probs if all(p is not None for p in student_probs) else None,
        )
    }
    if trows:
        scored["teacher"] = ([r["label"] for r in trows], None)
    scored.update(baselines)
    metrics = {
        who: classification_metrics(gold, pred, labels, probs)
        for who, (pred, probs) in scored.items()
    }
    ts_dir = out / name
    ts_dir.mkdir(exist_ok=True)
    teacher_labels = {r["id"]: r["label"] for r in trows}
    page_rows = mistake_rows(
        [{**r, "confidence": c} for r, (c, _) in zip(srows, confidences, strict=True)],
        teacher_labels,
        labels,
    )
    mistakes_path = ts_dir / "mistakes.jsonl"
    with mistakes_path.open("w") as f:
        for m in page_rows:
            f.write(json.dumps(m, ensure_ascii=False) + "\n")
    page = write_mistakes_page(ts_dir / "mistakes.html", name, page_rows, len(srows))
    pq.write_table(to_table(srows), ts_dir / "student_predictions.parquet")
    if trows:
        pq.write_table(to_table(trows), ts_dir / "teacher_predictions.parquet")
    result: dict[str, Any] = {
        "rows": len(srows),
        "models": list(metrics),
        "accuracy": {who: m["accuracy"] for who, m in metrics.items()},
        "balanced_accuracy": {who: m["balanced_accuracy"] for who, m in metrics.items()},
        "roc_auc": {who: m["roc_auc"] for who, m in metrics.items()},
        "per_class": {who: m["per_class"] for who, m in metrics.items()},
        "unparsed": {who: m["unparsed"] for who, m in metrics.items()},
        "confusion": {who: m["confusion"] for who, m in metrics.items()},
        "mistakes": sum(m["kind"] == ERROR for m in page_rows),
        "disagreements": sum(m["kind"] != ERROR for m in page_rows),
        "mistakes_file": str(mistakes_path),
        "mistakes_page": str(page),
    }
    if trows:
        result["teacher_failed"] = sum(1 for r in trows if r["status"] == "failed")
    log.info("evaluate %s: %s", name, {k: round(v, 4) for k, v in result["accuracy"].items()})
    return result


def run_evaluate(run: Run, endpoint: TeacherEndpoint | None) -> dict[str, Any]:
    import ray

    started = time.perf_counter()
    cfg = run.cfg
    checkpoint, checkpoint_from = run.student_checkpoint()
    out = run.stage_dir("evaluate")
    tests = to_table(test_set_rows(cfg))  # read once, for the student and the teacher

    student_rows = (
        ray.data.from_arrow(tests)
        .map_batches(
            StudentPredictor,
            fn_constructor_kwargs={
                "checkpoint": checkpoint,
                "task": cfg.task,
                "max_new_tokens": cfg.evaluate.max_new_tokens,
            },
            batch_format="pyarrow",
            batch_size=cfg.evaluate.batch_size,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=1,
            num_gpus=1 if cfg.train.use_gpu else 0,
        )
        .take_all()
    )
    teacher_rows: list[dict[str, Any]] = []
    if cfg.evaluate.teacher:
        if endpoint is None:
            raise ValueError("evaluate.teacher is true but no teacher endpoint was given")
        session = TeacherSession(run, endpoint)
        teacher_rows = (
            session.pool(session.dataset(tests), params={"n": 1}, voters=False)
            .map_batches(parse_batch, fn_kwargs={"task": cfg.task}, batch_format="pyarrow")
            .take_all()
        )

    students, teachers = _by_test_set(student_rows), _by_test_set(teacher_rows)
    majority = majority_label(run.require("curate")["labels"])
    tfidf = None
    if "tfidf_logreg" in cfg.evaluate.baselines:
        texts, labels = training_rows(run)
        tfidf = TfidfBaseline(texts, labels, seed=cfg.run.seed)
        log.info("TF-IDF + logistic regression baseline fitted on %d training rows", len(texts))
    sets: dict[str, Any] = {}
    for name, srows in students.items():
        baselines: dict[str, Any] = {}
        if "majority" in cfg.evaluate.baselines:
            baselines["majority"] = ([majority] * len(srows), None)
        if tfidf is not None:
            baselines["tfidf_logreg"] = tfidf.predict([r["input"] for r in srows])
        sets[name] = score_test_set(
            name, srows, teachers.get(name, []), baselines, cfg.task.labels, out
        )
        sets[name]["majority_label"] = majority

    plot = accuracy_plot(sets, out / "accuracy.png")
    paid = [r for r in teacher_rows if r["cost"] is not None]
    return {
        "checkpoint": checkpoint,
        "checkpoint_from": checkpoint_from,
        "test_sets": sets,
        "baselines": list(cfg.evaluate.baselines),
        # What scoring the teacher cost this run (recorded and cached answers cost nothing).
        "teacher_spend": {
            "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in paid),
            "completion_tokens": sum(r["completion_tokens"] or 0 for r in paid),
            "cost_usd": from_pico(sum(to_pico(r["cost"]) for r in paid)),
        },
        "plot": str(plot),
        "seconds": round(time.perf_counter() - started, 2),
    }


def accuracy_plot(sets: dict[str, Any], path: Path) -> Path:
    """Grouped bars: accuracy of student, teacher and baseline per test set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sets)
    whos = list(dict.fromkeys(w for n in names for w in sets[n]["models"]))
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(whos) * len(names) + 1.5), 3.2))
    width = 0.8 / len(whos)
    for i, who in enumerate(whos):
        vals = [sets[n]["accuracy"].get(who, 0.0) for n in names]
        bars = ax.bar([x + i * width for x in range(len(names))], vals, width, label=who)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([x + width * (len(whos) - 1) / 2 for x in range(len(names))], names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
