"""Evaluate stage: the student, the teacher and a naive baseline on fixed test sets.

For each configured test set: accuracy and per-class precision/recall/F1 of the student (greedy
answers from the checkpoint, parsed like the teacher's), of the teacher (called through the
same pool as in generate, so recorded/cached answers are reused) and of the majority-class
baseline (the most frequent label of the training set). Every student mistake is written out
for a person to read. Output: runs/<id>/evaluate/.
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
from ray_pipeline.data.schema import dumps, new_row, row_id, to_table
from ray_pipeline.data.sources import read_texts
from ray_pipeline.evaluate.metrics import classification_metrics, majority_label
from ray_pipeline.evaluate.report import load_report, require
from ray_pipeline.generate.teacher_calls import parse_rows
from ray_pipeline.runtime import Run, TeacherEndpoint
from ray_pipeline.teacher.parse import normalize_label
from ray_pipeline.teacher.prompts import Prompt

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
        answers = self.student.complete(
            [json.loads(r["messages"]) for r in rows], max_new_tokens=self.max_new_tokens
        )
        for row, answer in zip(rows, answers, strict=True):
            row.update(response=answer, teacher="student")
        return to_table(parse_rows(rows, self.task))


def student_checkpoint(report: dict[str, Any], run_dir: Path) -> tuple[str, str]:
    """(checkpoint, where it came from): the sweep's best trial when a sweep ran, else train's."""
    if "sweep" in report and report["sweep"].get("best", {}).get("checkpoint"):
        return report["sweep"]["best"]["checkpoint"], "sweep.best"
    return require(report, "train", run_dir)["checkpoint"], "train"


def eval_rows(run: Run) -> list[dict[str, Any]]:
    """One row per test example, in the row schema (split='test', source=test set name)."""
    cfg = run.cfg
    if not cfg.evaluate.test_sets:
        raise ValueError("evaluate.test_sets is empty: there is nothing to evaluate on")
    prompt = Prompt.from_task(cfg.task)
    rows = []
    for ts in cfg.evaluate.test_sets:
        for i, rec in enumerate(read_texts(ts.path, ts.input_field, ts.limit), 1):
            if rec.get(ts.gold_field) in (None, ""):
                raise ValueError(
                    f"{ts.path}: record {i} has no gold label in field {ts.gold_field!r}"
                )
            gold = normalize_label(rec[ts.gold_field], cfg.task.labels, cfg.task.label_aliases)
            if gold is None:
                raise ValueError(
                    f"{ts.path}: record {i}: gold label {rec[ts.gold_field]!r} is not one of {cfg.task.labels}"
                )
            text = rec[ts.input_field]
            rows.append(
                new_row(
                    id=row_id(ts.name, text),
                    source=ts.name,
                    source_line=i,
                    input=text,
                    messages=dumps(prompt.messages(text)),
                    prompt_hash=prompt.hash,
                    gold=gold,
                    split="test",
                )
            )
    return rows


def _by_test_set(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (r["source"], r["source_line"])):
        out.setdefault(r["source"], []).append(r)
    return out


def run_evaluate(run: Run, endpoint: TeacherEndpoint | None) -> dict[str, Any]:
    import ray

    from ray_pipeline.generate.stage import TeacherSession, parse_batch

    started = time.perf_counter()
    cfg = run.cfg
    report = load_report(run.dir)
    checkpoint, checkpoint_from = student_checkpoint(report, run.dir)
    baseline = majority_label(require(report, "curate", run.dir)["labels"])
    out = run.stage_dir("evaluate")
    tests = ray.data.from_arrow(to_table(eval_rows(run)))  # read by both student and teacher

    student_rows = tests.map_batches(
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
    ).take_all()
    teacher_rows: list[dict[str, Any]] = []
    if cfg.evaluate.teacher:
        if endpoint is None:
            raise ValueError("evaluate.teacher is true but no teacher endpoint was given")
        teacher_rows = (
            TeacherSession(run, endpoint)
            .pool(tests, params={"n": 1}, voters=False)
            .map_batches(parse_batch, fn_kwargs={"task": cfg.task}, batch_format="pyarrow")
            .take_all()
        )

    students, teachers = _by_test_set(student_rows), _by_test_set(teacher_rows)
    sets: dict[str, Any] = {}
    for name, srows in students.items():
        gold = [r["gold"] for r in srows]
        ts_dir = out / name
        ts_dir.mkdir(exist_ok=True)
        result: dict[str, Any] = {
            "rows": len(srows),
            "accuracy": {},
            "per_class": {},
            "unparsed": {},
        }
        scored = {"student": [r["label"] for r in srows], "baseline": [baseline] * len(srows)}
        trows = teachers.get(name, [])
        if trows:
            scored["teacher"] = [r["label"] for r in trows]
            result["teacher_failed"] = sum(1 for r in trows if r["status"] == "failed")
        for who, pred in scored.items():
            m = classification_metrics(gold, pred, cfg.task.labels)
            result["accuracy"][who] = m["accuracy"]
            result["per_class"][who] = m["per_class"]
            result["unparsed"][who] = m["unparsed"]
            result.setdefault("confusion", {})[who] = m["confusion"]
        result["baseline_label"] = baseline
        teacher_by_id = {r["id"]: r for r in trows}
        mistakes = [r for r in srows if r["label"] != r["gold"]]
        mistakes_path = ts_dir / "mistakes.jsonl"
        with mistakes_path.open("w") as f:
            for r in mistakes:
                t = teacher_by_id.get(r["id"])
                f.write(
                    json.dumps(
                        {
                            "line": r["source_line"],
                            "input": r["input"],
                            "gold": r["gold"],
                            "student_label": r["label"],
                            "student_answer": r["response"],
                            "teacher_label": t["label"] if t else None,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
        result["mistakes"] = len(mistakes)
        result["mistakes_file"] = str(mistakes_path)
        pq.write_table(to_table(srows), ts_dir / "student_predictions.parquet")
        if trows:
            pq.write_table(to_table(trows), ts_dir / "teacher_predictions.parquet")
        sets[name] = result
        log.info("evaluate %s: %s", name, {k: round(v, 4) for k, v in result["accuracy"].items()})

    plot = accuracy_plot(sets, out / "accuracy.png")
    return {
        "checkpoint": checkpoint,
        "checkpoint_from": checkpoint_from,
        "test_sets": sets,
        "plot": str(plot),
        "seconds": round(time.perf_counter() - started, 2),
    }


def accuracy_plot(sets: dict[str, Any], path: Path) -> Path:
    """Grouped bars: accuracy of student, teacher and baseline per test set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    whos = ["student", "teacher", "baseline"]
    names = list(sets)
    fig, ax = plt.subplots(figsize=(max(4, 2.2 * len(names)), 3.2))
    width = 0.8 / len(whos)
    for i, who in enumerate(whos):
        vals = [sets[n]["accuracy"].get(who, 0.0) for n in names]
        bars = ax.bar([x + i * width for x in range(len(names))], vals, width, label=who)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([x + width for x in range(len(names))], names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
