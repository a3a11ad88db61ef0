"""Evaluate stage: the student, the teacher and naive baselines on fixed test sets.

For each configured test set, in one table: accuracy, balanced accuracy, per-class
precision/recall/F1, ROC-AUC (where a model gives probabilities) and the confusion matrix of
the student (greedy answers from the checkpoint, parsed like the teacher's), of the teacher
(called through the same pool as in generate, so recorded/cached answers are reused) and of
the baselines: the majority class of the curated labels, and TF-IDF + logistic regression
fitted on the student's own training rows. Every student mistake and every student/teacher
disagreement goes on the test set's mistakes page (HTML). Output: runs/<id>/evaluate/.

A generative task is scored against reference answers instead (``evaluate.generative``):
exact match, schema adherence, ROUGE-L and the LLM judge's mean score, for the student, the
teacher and the baselines (the most frequent training answer; the input echoed). The test
sets curate built in the run are scored beside evaluate.test_sets.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ray_pipeline import storage
from ray_pipeline.config import TaskSection
from ray_pipeline.data.schema import answer_text, to_table
from ray_pipeline.data.test_sets import built_test_sets, test_set_rows
from ray_pipeline.evaluate import generative as gen
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

        # A mirrored run's checkpoint comes by its URI: copied to this actor's node once.
        self.student = Student.load(storage.local_copy(checkpoint))
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
    mistakes_path, page = write_test_set_files(ts_dir, name, page_rows, srows, trows)
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


def write_test_set_files(
    ts_dir: Path,
    name: str,
    page_rows: list[dict[str, Any]],
    srows: list[dict[str, Any]],
    trows: list[dict[str, Any]],
) -> tuple[Path, Path]:
    """A test set's mistakes (JSONL and the HTML page) and the student's and teacher's
    predictions (Parquet; the teacher's only when it answered): (mistakes file, page)."""
    mistakes_path = ts_dir / "mistakes.jsonl"
    with mistakes_path.open("w") as f:
        for m in page_rows:
            f.write(json.dumps(m, ensure_ascii=False) + "\n")
    page = write_mistakes_page(ts_dir / "mistakes.html", name, page_rows, len(srows))
    pq.write_table(to_table(srows), ts_dir / "student_predictions.parquet")
    if trows:
        pq.write_table(to_table(trows), ts_dir / "teacher_predictions.parquet")
    return mistakes_path, page


def run_evaluate(run: Run, endpoint: TeacherEndpoint | None) -> dict[str, Any]:
    import ray

    started = time.perf_counter()
    cfg = run.cfg
    checkpoint, checkpoint_from = run.student_checkpoint()
    out = run.stage_dir("evaluate")
    built = run.require("curate")["outputs"].get("test_sets")
    extra = built_test_sets(Path(built) / "frozen.json") if built else []
    tests = to_table(test_set_rows(cfg, extra))  # read once, for the student and the teacher

    student_rows = (
        ray.data.from_arrow(tests)
        .map_batches(
            StudentPredictor,
            fn_constructor_kwargs={
                "checkpoint": run.shared_if_inside(checkpoint),
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
    paid = [r for r in teacher_rows if r["cost"] is not None]
    section = {
        "checkpoint": checkpoint,
        "checkpoint_from": checkpoint_from,
        "baselines": list(cfg.evaluate.baselines),
        # What scoring the teacher cost this run (recorded and cached answers cost nothing).
        "teacher_spend": {
            "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in paid),
            "completion_tokens": sum(r["completion_tokens"] or 0 for r in paid),
            "cost_usd": from_pico(sum(to_pico(r["cost"]) for r in paid)),
        },
    }
    if cfg.task.generative:
        sets, judge_info = evaluate_generative(run, endpoint, students, teachers, out)
        plot = accuracy_plot(sets, out / "rouge_l.png", metric="rouge_l")
        return {
            **section,
            "kind": "generative",
            "test_sets": sets,
            "judge": judge_info,
            "plot": str(plot),
            "seconds": round(time.perf_counter() - started, 2),
        }
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
    return {
        **section,
        "test_sets": sets,
        "plot": str(plot),
        "seconds": round(time.perf_counter() - started, 2),
    }


def training_answers(run: Run) -> list[str]:
    """The answers (as the student learns them) of the rows the student trained on: the
    curated dataset without the validation rows, for the frequent-answer baseline."""
    from ray_pipeline.train.data import in_split

    dataset = run.require("curate")["outputs"]["train"]
    table = pq.read_table(dataset, columns=["id", "output"]).to_pylist()
    return [
        answer_text(r["output"])
        for r in table
        if r["output"] is not None and in_split(r["id"], "train", run.cfg.train.val_fraction)
    ]


def evaluate_generative(
    run: Run,
    endpoint: TeacherEndpoint | None,
    students: dict[str, list[dict[str, Any]]],
    teachers: dict[str, list[dict[str, Any]]],
    out: Path,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Every model's answers on every test set against the references (``generative``),
    the judge's requests sent through the teacher's actor pool; the mistakes pages."""
    cfg = run.cfg
    task, jc = cfg.task, cfg.evaluate.judge
    frequent = None
    if "frequent_answer" in cfg.evaluate.baselines:
        frequent = gen.frequent_answer(training_answers(run))
        log.info("frequent-answer baseline: %r", frequent)
    # Raw answers per test set and model: {set: {model: [answer text or None per row]}}.
    answers: dict[str, dict[str, list[str | None]]] = {}
    for name, srows in students.items():
        by_id = {r["id"]: r for r in teachers.get(name, [])}
        models: dict[str, list[str | None]] = {"student": [r["response"] for r in srows]}
        if by_id:
            # A failed call has no response: unparsed, like an answer with no value in it.
            models["teacher"] = [by_id[r["id"]]["response"] for r in srows]
        if frequent is not None:
            models["frequent_answer"] = [frequent] * len(srows)
        if "echo" in cfg.evaluate.baselines:
            models["echo"] = [r["input"] for r in srows]
        answers[name] = models
    judged: dict[tuple[str, str], dict[str, Any]] = {}
    judge_info = None
    if jc.enabled:
        if endpoint is None:
            raise ValueError("evaluate.judge is enabled but no teacher endpoint was given")
        cases = [
            (who, row, text or "")
            for name, srows in students.items()
            for who, texts in answers[name].items()
            for row, text in zip(srows, texts, strict=True)
        ]
        session = TeacherSession(run, endpoint)
        before = session.snapshot()
        with session.progress():
            replies = session.pool(
                session.dataset(to_table(gen.judge_requests(cases, jc))),
                params={"temperature": 0.0, "max_tokens": jc.max_tokens, "n": 1},
                voters=False,
                model=jc.model,
            ).take_all()
        judged = gen.judge_scores(replies, jc)
        after = session.snapshot()
        judge_info = {
            "model": jc.model or cfg.teacher.model,
            "scale": [jc.min_score, jc.max_score],
            "judged": len(judged),
            "failed": sum(1 for j in judged.values() if "error" in j),
            "calls": after["calls"] - before["calls"],
            "cache_hits": after["cache_hits"] - before["cache_hits"],
            "cost_usd": round(after["cost_usd"] - before["cost_usd"], 6),
        }
    sets: dict[str, Any] = {}
    for name, srows in students.items():
        refs = [r["gold"] for r in srows]
        metrics = {
            who: gen.generative_metrics(
                refs,
                texts,
                task,
                [judged[(who, r["id"])] for r in srows] if jc.enabled else None,
            )
            for who, texts in answers[name].items()
        }
        ts_dir = out / name
        ts_dir.mkdir(exist_ok=True)
        teacher_texts = (
            dict(zip([r["id"] for r in srows], answers[name]["teacher"], strict=True))
            if "teacher" in answers[name]
            else {}
        )
        page_rows = gen.generative_mistake_rows(
            [{**r, "confidence": _confidence(r)[0]} for r in srows],
            teacher_texts,
            task,
            {r["id"]: judged.get(("student", r["id"]), {}) for r in srows},
            (jc.min_score, jc.max_score) if jc.enabled else None,
        )
        mistakes_path, page = write_test_set_files(
            ts_dir, name, page_rows, srows, teachers.get(name) or []
        )
        sets[name] = {
            "rows": len(srows),
            "models": list(metrics),
            "metrics": metrics,
            "rouge_l": {who: m["rouge_l"] for who, m in metrics.items()},
            "mistakes": sum(m["kind"] == ERROR for m in page_rows),
            "disagreements": sum(m["kind"] != ERROR for m in page_rows),
            "mistakes_file": str(mistakes_path),
            "mistakes_page": str(page),
        }
        log.info(
            "evaluate %s: %s",
            name,
            {w: (round(m["exact_match"], 3), round(m["rouge_l"], 3)) for w, m in metrics.items()},
        )
    return sets, judge_info


def accuracy_plot(sets: dict[str, Any], path: Path, metric: str = "accuracy") -> Path:
    """Grouped bars: `metric` (accuracy; ROUGE-L for a generative task) of student, teacher
    and baselines per test set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sets)
    whos = list(dict.fromkeys(w for n in names for w in sets[n]["models"]))
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(whos) * len(names) + 1.5), 3.2))
    width = 0.8 / len(whos)
    for i, who in enumerate(whos):
        vals = [sets[n][metric].get(who, 0.0) for n in names]
        bars = ax.bar([x + i * width for x in range(len(names))], vals, width, label=who)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([x + width * (len(whos) - 1) / 2 for x in range(len(names))], names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel({"rouge_l": "ROUGE-L"}.get(metric, metric))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
