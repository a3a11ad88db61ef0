"""Evaluation of a generative task: answers against reference answers.

Per model (student, teacher, baselines) on each test set: exact match, the JSON/schema
adherence rate (when the task has an output schema), ROUGE-L, and the mean score of an LLM
judge (``evaluate.judge``) asked through the teacher stage. Plain functions over rows; the
stage (``evaluate.stage``) sends the judge's requests through the teacher's actor pool, and
tests send them through ``TeacherCaller`` directly, both against the real HTTP server.

What is compared: with an output schema, the JSON value parsed out of an answer (the
tolerant parser of the generate stage: fences and prose around it are fine), as compact JSON
(an answer with no value in it is *unparsed*: wrong for exact match, empty for ROUGE-L, not
adherent); without one, the answer's text, stripped. A reference that is JSON is compared as
its compact JSON too. ROUGE-L reads a structured answer's content: the text of its values,
keys left out (they are format, which schema adherence scores), so that a right frame with a
wrong answer does not score half.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from ray_pipeline.config import EvalJudgeSection, TaskSection
from ray_pipeline.data.schema import FAILED, answer_text, dumps, new_row, row_id
from ray_pipeline.evaluate.metrics import exact_match, json_adherence, rouge_l
from ray_pipeline.evaluate.mistakes import DISAGREEMENT, ERROR
from ray_pipeline.teacher.parse import ParseError, parse_generative, parse_structured

_SLOT = re.compile(r"\{(input|reference|answer|min_score|max_score)\}")


def scored_answer(response: str | None, task: TaskSection) -> str | None:
    """The text of an answer that is compared with the reference (see the module
    docstring); None when the answer is empty or, with an output schema, holds no value."""
    if response is None:
        return None
    parsed = parse_generative(response, task.output_schema)
    return None if parsed.output is None else answer_text(dumps(parsed.output))


def reference_text(reference: str, task: TaskSection) -> str:
    """A reference as compared: with an output schema, its compact JSON when it is JSON."""
    if task.output_schema is None:
        return reference.strip()
    try:
        value, _ = parse_structured(reference)
    except ParseError:
        return reference.strip()
    return answer_text(dumps(value))


def content_text(answer: str) -> str:
    """The words ROUGE-L compares: of a JSON object or list its values' text (nested values
    too, keys left out), else the text itself."""
    try:
        value = json.loads(answer)
    except json.JSONDecodeError:
        return answer

    def walk(v: Any) -> list[str]:
        if isinstance(v, dict):
            return [w for x in v.values() for w in walk(x)]
        if isinstance(v, list):
            return [w for x in v for w in walk(x)]
        return [] if v is None else [str(v)]

    return " ".join(walk(value))


def frequent_answer(answers: list[str]) -> str:
    """The most frequent training answer (ties: the first in sorted order, deterministic)."""
    if not answers:
        raise ValueError("no training answers to take the most frequent from")
    counts = Counter(answers)
    return min(counts, key=lambda a: (-counts[a], a))


# ------------------------------------------------------------------------------- judge
def judge_prompt(cfg: EvalJudgeSection, text: str, reference: str, answer: str) -> str:
    """The judge's prompt with its slots filled in one pass (an answer holding the text
    '{reference}' stays as it is)."""
    values = {
        "input": text,
        "reference": reference,
        "answer": answer,
        "min_score": str(cfg.min_score),
        "max_score": str(cfg.max_score),
    }
    return _SLOT.sub(lambda m: values[m.group(1)], cfg.prompt)


def judge_requests(
    cases: list[tuple[str, dict[str, Any], str]], cfg: EvalJudgeSection
) -> list[dict[str, Any]]:
    """One request row per (model, test row, answer text): the judge's messages, with an id
    of the model and the row (``scores.judged``: which answer it is)."""
    out = []
    for who, row, answer in cases:
        prompt = judge_prompt(cfg, row["input"], row["gold"], answer)
        out.append(
            new_row(
                id=row_id(f"judge:{who}", row["id"]),
                source=row["source"],
                source_line=row["source_line"],
                input=row["input"],
                messages=dumps([{"role": "user", "content": prompt}]),
                scores=dumps({"judged": {"model": who, "id": row["id"]}}),
            )
        )
    return out


def judge_scores(
    replies: list[dict[str, Any]], cfg: EvalJudgeSection
) -> dict[tuple[str, str], dict[str, Any]]:
    """{(model, test row id): {score, reason} or {error}} from the answered request rows: a
    failed call or a judgement with no score on the scale is an error, never a score."""
    from ray_pipeline.curate.judge import parse_judgement

    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in replies:
        judged = json.loads(r["scores"])["judged"]
        key = (judged["model"], judged["id"])
        if r["status"] == FAILED:
            out[key] = {"error": f"judge_error: {r['reason']}"}
            continue
        try:
            score, why = parse_judgement(r["response"], cfg.min_score, cfg.max_score)
        except ValueError as e:
            out[key] = {"error": f"judge_unparsable: {e}"}
            continue
        out[key] = {"score": score, "reason": why}
    return out


# ------------------------------------------------------------------------------ scoring
def generative_metrics(
    references: list[str],
    responses: list[str | None],
    task: TaskSection,
    judged: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Exact match, schema adherence (None without a schema), ROUGE-L, the judge's mean score
    (None without a judge) of raw answers `responses` against `references`."""
    refs = [reference_text(r, task) for r in references]
    answers = [scored_answer(a, task) for a in responses]
    content = content_text if task.output_schema is not None else str
    out: dict[str, Any] = {
        "rows": len(refs),
        "exact_match": exact_match(refs, answers),
        "json_adherence": None,
        "rouge_l": rouge_l(
            [content(r) for r in refs], [None if a is None else content(a) for a in answers]
        ),
        "judge_score": None,
        "judge_failed": None,
        "unparsed": sum(a is None for a in answers),
    }
    if task.output_schema is not None:
        parsed = [None if a is None else _as_json(a) for a in answers]
        out["json_adherence"] = json_adherence(parsed, task.output_schema)
    if judged is not None:
        scores = [j["score"] for j in judged if "score" in j]
        out["judge_score"] = sum(scores) / len(scores) if scores else None
        out["judge_failed"] = len(judged) - len(scores)
    return out


def _as_json(text: str) -> str:
    # answer_text gives a structured answer as its JSON and a text answer as the text.
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return json.dumps(text)
    return text


def generative_mistake_rows(
    student_rows: list[dict[str, Any]],
    teacher_answers: dict[str, str | None],
    task: TaskSection,
    judged: dict[str, dict[str, Any]],
    scale: tuple[int, int] | None,
) -> list[dict[str, Any]]:
    """The mistakes page's rows (``mistakes.render_mistakes_html``): each student answer that
    is not an exact match of the reference (kind 'error', its judge score as the error type
    when judged), then each exact student answer the teacher did not match (kind
    'disagreement'); the lowest judge scores first. `student_rows` carry id, input, gold,
    response, source_line and confidence; `teacher_answers` maps id -> the teacher's raw
    answer; `judged` maps id -> the student answer's judgement."""
    out = []
    for r in student_rows:
        ref = reference_text(r["gold"], task)
        mine = scored_answer(r["response"], task)
        wrong = mine is None or mine.strip().casefold() != ref.strip().casefold()
        teacher = teacher_answers.get(r["id"])
        t_text = scored_answer(teacher, task) if r["id"] in teacher_answers else None
        teacher_right = (
            None
            if r["id"] not in teacher_answers
            else t_text is not None and t_text.strip().casefold() == ref.strip().casefold()
        )
        if not wrong and teacher_right in (None, True):
            continue
        j = judged.get(r["id"], {})
        if mine is None:
            kind_of = "unparsed"
        elif "error" in j:
            kind_of = "judge failed"
        elif "score" in j and scale is not None:
            kind_of = f"judge {j['score']}/{scale[1]}"
        else:
            kind_of = "not exact"
        out.append(
            {
                "kind": ERROR if wrong else DISAGREEMENT,
                "line": r.get("source_line"),
                "input": r["input"],
                "gold": ref,
                "teacher": t_text if t_text is not None else teacher,
                "student": mine if mine is not None else r["response"],
                "confidence": r.get("confidence"),
                "error_type": kind_of if wrong else "",
                "teacher_right": teacher_right,
                "judge_score": j.get("score"),
            }
        )
    out.sort(key=lambda m: (m["kind"] != ERROR, m["judge_score"] or 0, -(m["confidence"] or 0)))
    return out
