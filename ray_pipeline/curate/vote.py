"""Teacher aggregation: the majority label of a row's answers and how much they agree.

A row's votes (JSON in ``votes``) are the answers the generate stage collected: the main
teacher and its voters (teacher.voters), several samples (teacher.n), or recorded answers of
other prompts or models (data.logs[].vote_fields); each with the label parsed from it. With
``group_by: input`` the answers of every row with the same input are first merged into the
vote of the first of those rows (``merge_votes``), e.g. logs of several teachers.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from ray_pipeline.config import TaskSection, VoteSection
from ray_pipeline.curate.dedup import normalize_text
from ray_pipeline.curate.filters import filter_row
from ray_pipeline.data.schema import OK, answer_json, dumps


def row_votes(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The row's votes; a row without any votes with its own answer."""
    if row["votes"]:
        return json.loads(row["votes"])
    return [
        {"teacher": row["teacher"], "sample": 0, "response": row["response"], "label": row["label"]}
    ]


def merge_scores(row: dict[str, Any], key: str, value: Any) -> None:
    """Set one step's entry in the row's ``scores`` JSON, keeping the others."""
    scores = json.loads(row["scores"]) if row["scores"] else {}
    scores[key] = value
    row["scores"] = dumps(scores)


def majority(counts: Counter, main: str | None, labels: list[str]) -> str:
    """The most voted label; a tie goes to the main teacher's label when it is among the
    tied, else to the first tied one in the task's label order."""
    top = max(counts.values())
    tied = [lab for lab in labels if counts.get(lab) == top]
    return main if main in tied else tied[0]


def merge_votes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per group of ok rows with the same normalised input: the first by (source, line)
    gets every row's votes; the others are filtered (``vote_merged``), naming it. Rows of
    one input must all be in `rows` (``global_steps`` partitions by the text key)."""
    live = [r for r in rows if r["status"] == OK and r["input"] is not None]
    live.sort(
        key=lambda r: (r["source"] or "", r["source_line"] if r["source_line"] is not None else -1)
    )
    carriers: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for row in live:
        key = normalize_text(row["input"])
        if key not in carriers:
            carriers[key] = (row, row_votes(row))
            continue
        carrier, votes = carriers[key]
        votes.extend(row_votes(row))
        filter_row(row, f"vote_merged: its answers count in the vote of row {carrier['id']}")
    for carrier, votes in carriers.values():
        if len(votes) > len(row_votes(carrier)):
            carrier["votes"] = dumps(votes)
    return rows


class Vote:
    """Label each ok row by the majority of its votes and store the vote and its agreement in
    ``scores.vote``. A row whose label changes gets the canonical answer of the new one."""

    def __init__(self, task: TaskSection):
        self.task = task

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        labels = self.task.labels
        for row in rows:
            if row["status"] != OK:
                continue
            counts = Counter(v.get("label") for v in row_votes(row) if v.get("label") in labels)
            if not counts:
                counts = Counter([row["label"]])
            winner = majority(counts, row["label"], labels)
            vote = {
                "label": winner,
                "agreement": round(counts[winner] / sum(counts.values()), 4),
                "counts": dict(counts),
            }
            if winner != row["label"]:
                vote["relabeled_from"] = row["label"]
                row["label"] = winner
                row["output"] = answer_json(self.task.label_key, winner)
            merge_scores(row, "vote", vote)
        return rows


class Review:
    """Rows whose vote agreement is under ``min_agreement`` leave training for the review
    file (``low_agreement``), unless a gold label decided them (the gold check ran first)."""

    def __init__(self, cfg: VoteSection, task: TaskSection):
        self.min_agreement = cfg.min_agreement
        self.labels = task.labels

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in rows:
            if row["status"] != OK or row["gold"] in self.labels or not row["scores"]:
                continue
            vote = json.loads(row["scores"]).get("vote")
            if vote is not None and vote["agreement"] < self.min_agreement:
                tally = ", ".join(f"{lab}: {n}" for lab, n in sorted(vote["counts"].items()))
                filter_row(
                    row,
                    f"low_agreement: {vote['agreement']:.2f} < {self.min_agreement:g} ({tally})",
                )
        return rows
