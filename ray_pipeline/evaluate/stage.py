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
from ray_pipeline.data.schema import to_table
from ray_pipeline.data.test_sets import test_set_rows
from ray_pipeline.evaluate.metrics import classification_metrics, majority_label
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


def run_evaluate(run: Run, endpoint: TeacherEndpoint | None) -> dict[str, Any]:
    import ray

    started = time.perf_counter()
    cfg = run.cfg
    checkpoint, checkpoint_from = run.student_checkpoint()
    baseline = majority_label(run.require("curate")["labels"])
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
    paid = [r for r in teacher_rows if r["cost"] is not None]
    return {
        "checkpoint": checkpoint,
        "checkpoint_from": checkpoint_from,
        "test_sets": sets,
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
