"""Evaluate any student checkpoint on any file, with no run folder and no Ray:
``distill evaluate CHECKPOINT --data FILE --text-column C --label-column L [--json]``.

The checkpoint carries what it needs (its task kind, labels, label key, aliases, the task
prompt and, for a generative task, the answers' output schema): each text is put into that
prompt exactly as in training and answered by ``Student.answer``. A label task's answer is
parsed like a teacher's and scored against the label column (``classification_metrics``); a
generative task's is scored against the reference answer in that column with the evaluate
stage's own functions (``generative.generative_metrics``: exact match, schema adherence,
ROUGE-L), and with its LLM judge when a run config names one (``--judge CONFIG``). The file is
CSV, JSONL or Parquet (by extension).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray_pipeline.config import DistillConfig, TaskSection
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.data.schema import dumps, normalize_label
from ray_pipeline.data.sources import read_records
from ray_pipeline.evaluate.metrics import classification_metrics
from ray_pipeline.teacher.parse import ParseError, parse_answer, parse_structured

log = logging.getLogger("distill.evaluate")

LABEL, GENERATIVE = "label", "generative"
NO_JUDGE = "no --judge CONFIG given: the LLM judge needs a teacher"


def _records(
    path: str | Path, text_column: str, gold_column: str, limit: int | None
) -> Iterator[tuple[int, str, Any]]:
    """(record number, text, gold value) of every record; a record without both columns or
    without text is an error naming the file, the record and the column."""
    records = read_records(path)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"{path}: no records to evaluate on")
    for i, rec in enumerate(records, 1):
        if text_column not in rec or gold_column not in rec:
            missing = [c for c in (text_column, gold_column) if c not in rec]
            raise ValueError(f"{path}: record {i} has no column(s) {missing}; it has {sorted(rec)}")
        text = rec[text_column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: record {i} has no text in column {text_column!r}")
        yield i, text, rec[gold_column]


def labelled_texts(
    path: str | Path,
    text_column: str,
    label_column: str,
    labels: list[str],
    aliases: dict[str, str],
    limit: int | None = None,
) -> tuple[list[str], list[str]]:
    """(texts, gold labels) of a file; a record without text, without a label or with a
    label not among `labels` is an error naming the file, the record and the column."""
    texts, gold = [], []
    for i, text, value in _records(path, text_column, label_column, limit):
        label = normalize_label(value, labels, aliases)
        if label is None:
            raise ValueError(
                f"{path}: record {i}: label {value!r} in column {label_column!r} "
                f"is not one of the checkpoint's labels {labels}"
            )
        texts.append(text)
        gold.append(label)
    return texts, gold


def referenced_texts(
    path: str | Path,
    text_column: str,
    reference_column: str,
    task: TaskSection,
    limit: int | None = None,
) -> tuple[list[str], list[str]]:
    """(texts, reference answers) of a file, each reference kept as written (a JSON value
    that is not a string as its JSON, as the evaluate stage's test sets keep it). With the
    task's output schema every reference (the JSON value in it, else its text) must satisfy
    it: a label column (0/1) or prose there means the file is not of this task, an error
    naming the record."""
    import jsonschema

    validator = (
        jsonschema.Draft202012Validator(task.output_schema)
        if task.output_schema is not None
        else None
    )
    texts, refs = [], []
    for i, text, value in _records(path, text_column, reference_column, limit):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(
                f"{path}: record {i} has no reference answer in column {reference_column!r}"
            )
        ref = value if isinstance(value, str) else dumps(value)
        if validator is not None:
            try:
                parsed, _ = parse_structured(ref)
            except ParseError:
                parsed = ref.strip()  # compared as its text (``generative.reference_text``)
            error = jsonschema.exceptions.best_match(validator.iter_errors(parsed))
            if error is not None:
                raise ValueError(
                    f"{path}: record {i}: reference {ref[:80]!r} in column "
                    f"{reference_column!r} does not satisfy the output schema of task "
                    f"{task.name!r} ({error.message}); is this a file of that task's answers?"
                )
        texts.append(text)
        refs.append(ref)
    return texts, refs


def task_kind(checkpoint: str | Path, meta: dict[str, Any]) -> str:
    """'label' or 'generative': as recorded (``task_kind``), else (a checkpoint written before
    it was) a label task when it has labels; a generative one from then is an error."""
    kind = meta.get("task_kind")
    if kind is None and meta.get("labels") and "prompt" in meta:
        return LABEL
    if kind is None:
        raise ValueError(
            f"{checkpoint}: its distill_checkpoint.json records no task kind, labels or prompt "
            "(a generative checkpoint written before checkpoints recorded task_kind and "
            "output_schema); retrain it with `distill train` to score it standalone"
        )
    return kind


def checkpoint_task(meta: dict[str, Any]) -> TaskSection:
    """A generative checkpoint's task as its run config declared it: name, prompt, schema."""
    p = meta["prompt"]
    return TaskSection(
        name=meta.get("task", "task"),
        kind=GENERATIVE,
        prompt={
            "template": p["template"],
            "placeholder": p["placeholder"],
            "system": p.get("system"),
        },
        output_schema=meta.get("output_schema"),
    )


def judge_config(config: str | Path) -> DistillConfig:
    """The run config whose LLM judge scores the answers (``--judge``): it must have
    evaluate.judge enabled (and so be a generative task's config) and, for a real teacher,
    its API key in the environment (checked before any model is loaded)."""
    from ray_pipeline.config import load_config

    cfg = load_config(config)
    if not cfg.evaluate.judge.enabled:
        raise ValueError(
            f"--judge {config}: evaluate.judge.enabled is false there; give a run config "
            "whose evaluate.judge is on (e.g. configs/qa_seeds.yaml)"
        )
    t = cfg.teacher
    if not t.simulator.enabled and not os.environ.get(t.api_key_env):
        raise ValueError(
            f"--judge {config}: teacher.api_key_env: the environment variable {t.api_key_env} "
            f"is not set (it must hold the API key for {t.base_url})"
        )
    return cfg


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    text_column: str,
    label_column: str,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    limit: int | None = None,
    device: str | None = None,
    judge: str | Path | None = None,
) -> dict[str, Any]:
    """The checkpoint's metrics on the file plus where they came from. A label task's:
    ``classification_metrics`` (accuracy, balanced accuracy, per class, confusion, ROC-AUC for
    a classifier) against `label_column`. A generative task's: ``generative_metrics`` against
    the reference answers in `label_column`, the judge's mean score when `judge` (a run
    config, see ``judge_config``) is given. The file is checked before the model is loaded."""
    from ray_pipeline.train.checkpoint import read_meta

    started = time.perf_counter()
    meta = read_meta(checkpoint)
    kind = task_kind(checkpoint, meta)
    if kind == GENERATIVE:
        return _evaluate_generative(
            checkpoint, meta, data, text_column, label_column, started,
            batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit, device=device,
            judge=judge,
        )  # fmt: skip
    if judge is not None:
        raise ValueError(
            f"--judge {judge}: {checkpoint} is a label task's checkpoint; the LLM judge scores "
            "generative answers against references"
        )
    labels, aliases = meta["labels"], meta.get("label_aliases", {})
    texts, gold = labelled_texts(data, text_column, label_column, labels, aliases, limit)
    student = _load_student(checkpoint, device)
    p = meta["prompt"]
    prompt = Prompt(p["template"], p["placeholder"], p.get("system"))
    answers = _answers(student, prompt, texts, batch_size, max_new_tokens)
    predicted = [parse_answer(a.text, meta["label_key"], labels, aliases).label for a in answers]
    probs = [a.probs for a in answers if a.probs is not None]
    metrics = classification_metrics(
        gold, predicted, labels, probs if len(probs) == len(texts) else None
    )
    return {
        **metrics,
        "checkpoint": str(Path(checkpoint).absolute()),
        "data": str(Path(data).absolute()),
        "kind": student.kind,
        "threshold": meta.get("threshold"),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _load_student(checkpoint: str | Path, device: str | None) -> Any:
    from ray_pipeline.train.student import Student

    return Student.load(checkpoint, device=device)


def _answers(
    student: Any, prompt: Prompt, texts: list[str], batch_size: int, max_new_tokens: int
) -> list[Any]:
    """The student's answer (``Student.answer``) to every text put into the task's prompt."""
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        out += student.answer(
            [prompt.messages(t) for t in chunk],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        log.info("evaluate: %d of %d rows answered", len(out), len(texts))
    return out


def _evaluate_generative(
    checkpoint: str | Path,
    meta: dict[str, Any],
    data: str | Path,
    text_column: str,
    reference_column: str,
    started: float,
    *,
    batch_size: int,
    max_new_tokens: int,
    limit: int | None,
    device: str | None,
    judge: str | Path | None,
) -> dict[str, Any]:
    from ray_pipeline.evaluate.generative import generative_metrics

    task = checkpoint_task(meta)
    texts, refs = referenced_texts(data, text_column, reference_column, task, limit)
    judge_cfg = judge_config(judge) if judge is not None else None
    student = _load_student(checkpoint, device)
    answers = [
        a.text for a in _answers(student, Prompt.from_task(task), texts, batch_size, max_new_tokens)
    ]
    judged: list[dict[str, Any]] | None = None
    judge_info: dict[str, Any] = {"run": False, "reason": NO_JUDGE}
    if judge_cfg is not None:
        judged, judge_info = judge_answers(judge_cfg, judge, texts, refs, answers)
    metrics = generative_metrics(refs, answers, task, judged)
    return {
        **metrics,
        "task": task.name,
        "task_kind": GENERATIVE,
        "output_schema": task.output_schema,
        "judge": judge_info,
        "checkpoint": str(Path(checkpoint).absolute()),
        "manifest": meta.get("manifest"),
        "data": str(Path(data).absolute()),
        "text_column": text_column,
        "reference_column": reference_column,
        "kind": student.kind,
        "max_new_tokens": max_new_tokens,
        "seconds": round(time.perf_counter() - started, 2),
    }


def judge_answers(
    cfg: DistillConfig,
    config: str | Path,
    texts: list[str],
    references: list[str],
    answers: list[str],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The judgement of every answer ({score, reason} or {error}), asked as the evaluate
    stage asks it (``generative.judge_requests``/``judge_scores``: the config's judge prompt,
    scale and model) through the teacher stage's caller, against the config's teacher (the
    simulator started from `config` when enabled). No run folder: no response cache, no
    shared rate limit or budget. Also what was asked of whom."""
    import asyncio

    from ray_pipeline.data.schema import new_row
    from ray_pipeline.evaluate import generative as gen
    from ray_pipeline.teacher.caller import TeacherCaller, ask_specs
    from ray_pipeline.teacher.session import config_endpoint

    jc = cfg.evaluate.judge
    rows = [
        # Ids by record number: the same question twice is judged twice.
        new_row(id=str(i), source="evaluate", source_line=i, input=t, gold=ref)
        for i, (t, ref) in enumerate(zip(texts, references, strict=True), 1)
    ]
    requests = gen.judge_requests(
        [("student", r, a or "") for r, a in zip(rows, answers, strict=True)], jc
    )
    params = {"temperature": 0.0, "max_tokens": jc.max_tokens, "n": 1}
    with config_endpoint(cfg, config) as endpoint:
        specs = ask_specs(cfg.teacher, endpoint, params, voters=False, model=jc.model)
        caller = TeacherCaller(specs, cfg.teacher.model_dump(mode="json"))

        async def ask() -> list[dict[str, Any]]:
            try:
                return await caller.call_rows(requests)
            finally:
                await caller.aclose()

        replies = asyncio.run(ask())
    by_row = gen.judge_scores(replies, jc)
    judged = [by_row[("student", r["id"])] for r in rows]
    info = {
        "run": True,
        "config": str(Path(config).absolute()),
        "model": specs[0].model,
        "simulator": cfg.teacher.simulator.enabled,
        "scale": [jc.min_score, jc.max_score],
        "judged": len(judged),
        "failed": sum("error" in j for j in judged),
    }
    log.info("evaluate: judge %s scored %d answers", info["model"], len(judged))
    return judged, info
