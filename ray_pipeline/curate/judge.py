"""The LLM judge: a rubric prompt scores each kept row 1-5 with a reason, through the teacher
stage (``TeacherSession.pool``: its response cache, shared rate limits and budget).

A judged row travels through the teacher's actor pool as a *request row*: the same id and
input, the judge's messages, no response, and the row itself (JSON) in ``scores._row``;
``from_replies`` puts the row back with ``scores.judge`` = {score, reason, model, cost,
cached}. A failed judge call fails the row (``judge_error``, or ``budget_exhausted`` when
the budget ran out: the run then stops, and a re-run continues from the cache).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ray_pipeline.config import JudgeSection
from ray_pipeline.curate.filters import filter_row
from ray_pipeline.curate.vote import merge_scores
from ray_pipeline.data.schema import FAILED, OK, answer_text, dumps, new_row
from ray_pipeline.data.subsets import stable_unit
from ray_pipeline.teacher.parse import ParseError, parse_structured

_SLOT = re.compile(r"\{(input|answer)\}")
_STASH = "_row"


def judge_prompt(rubric: str, text: str, answer: str) -> str:
    """The rubric with {input} and {answer} filled in (in one pass: an input holding the
    text '{answer}' stays as it is)."""
    values = {"input": text, "answer": answer}
    return _SLOT.sub(lambda m: values[m.group(1)], rubric)


def to_requests(rows: list[dict[str, Any]], rubric: str, target: str) -> list[dict[str, Any]]:
    """Every ok row as a request row for the judge, asking about the answer the student will
    learn (`target`, train.target: 'canonical' the parsed answer, as relabeled by vote or
    gold; 'raw' the teacher's text); other rows as they are."""
    out = []
    for row in rows:
        if row["status"] != OK:
            out.append(row)
            continue
        answer = (
            answer_text(row["output"])
            if target == "canonical" and row["output"]
            else row["response"]
        )
        prompt = judge_prompt(rubric, row["input"], answer)
        out.append(
            new_row(
                id=row["id"],
                source=row["source"],
                source_line=row["source_line"],
                input=row["input"],
                messages=dumps([{"role": "user", "content": prompt}]),
                scores=dumps({_STASH: row}),
            )
        )
    return out


def parse_judgement(text: str, low: int = 1, high: int = 5) -> tuple[int, str]:
    """(score low-high, reason) from the judge's answer; ValueError naming what is wrong."""
    try:
        value, _ = parse_structured(text)
    except ParseError as e:
        raise ValueError(str(e)) from None
    if not isinstance(value, dict) or "score" not in value:
        raise ValueError(f"no 'score' in the judgement: {text[:120]!r}")
    score = value["score"]
    if isinstance(score, str) and score.strip().replace(".", "", 1).isdigit():
        score = float(score)
    if isinstance(score, bool) or not isinstance(score, int | float) or not low <= score <= high:
        raise ValueError(f"score {value['score']!r} is not a number from {low} to {high}")
    return round(score), str(value.get("reason") or "")


def from_replies(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The judged rows back, with ``scores.judge`` (or failed with the judge's error)."""
    out = []
    for req in rows:
        stash = json.loads(req["scores"]) if req["scores"] else {}
        if _STASH not in stash:
            out.append(req)  # not judged: was not ok
            continue
        row = stash[_STASH]
        if req["status"] == FAILED:
            reason = req["reason"] or "unknown"
            row.update(
                status=FAILED,
                reason=reason
                if reason.startswith("budget_exhausted")
                else f"judge_error: {reason}",
                error_class=req["error_class"],
                status_code=req["status_code"],
            )
            out.append(row)
            continue
        try:
            score, why = parse_judgement(req["response"])
        except ValueError as e:
            row.update(status=FAILED, reason=f"judge_unparsable: {e}")
            out.append(row)
            continue
        merge_scores(
            row,
            "judge",
            {
                "score": score,
                "reason": why,
                "model": req["teacher"],
                "cost": req["cost"],
                "cached": bool(req["cached"]),
            },
        )
        out.append(row)
    return out


def cutoff(counts: dict[int, int], cfg: JudgeSection) -> tuple[int, float]:
    """(lowest score kept, share of the rows *at* that score kept). For keep_top, the ties at
    the boundary score are thinned (by a hash of the row id) to keep the share exactly in
    expectation; for min_score every row at or above it is kept."""
    if cfg.min_score is not None:
        return math.ceil(cfg.min_score), 1.0
    if cfg.keep_top is None:
        return 1, 1.0
    total = sum(counts.values())
    wanted = cfg.keep_top * total
    above = 0
    for score in sorted(counts, reverse=True):
        if above + counts[score] >= wanted:
            return score, (wanted - above) / counts[score]
        above += counts[score]
    return 1, 1.0


def keep_judged(
    rows: list[dict[str, Any]], score_cut: int, tie_share: float, cfg: JudgeSection, seed: int
) -> list[dict[str, Any]]:
    """Filter the judged ok rows under the cut (``judge_low``)."""
    for row in rows:
        if row["status"] != OK:
            continue
        score = json.loads(row["scores"])["judge"]["score"]
        if score < score_cut:
            rule = (
                f"< min_score {cfg.min_score:g}"
                if cfg.min_score is not None
                else f"below the top {cfg.keep_top:.0%}"
            )
            filter_row(row, f"judge_low: score {score} {rule}")
        elif score == score_cut and stable_unit("judge", seed, row["id"]) >= tie_share:
            filter_row(
                row,
                f"judge_low: score {score} at the edge of the top {cfg.keep_top:.0%} (ties thinned)",
            )
    return rows
