"""Gold checks: rows with a human gold label (data.logs[].gold_field) against the teacher.

Every ok row with a gold label gets ``scores.gold`` (its gold label, the label it has here,
and each teacher's answers from its votes), from which the stage measures the accuracy of the
row labels and of every teacher. Where the label and gold disagree, the row keeps its label,
is dropped (``gold_disagreement``: the playbook's set C) or takes the gold label. Rows whose
answer *is* their gold label (data.logs[].label_from: gold, mixed in as the playbook's set B
does) are counted as mixed, not as teacher answers.
"""

from __future__ import annotations

from typing import Any

from ray_pipeline.config import GoldSection, TaskSection
from ray_pipeline.curate.filters import filter_row
from ray_pipeline.curate.vote import merge_scores, row_votes
from ray_pipeline.data.schema import OK, answer_json

GOLD_TEACHER = "gold:"  # prefix of the teacher name of rows labelled by their gold field


class GoldCheck:
    def __init__(self, cfg: GoldSection, task: TaskSection):
        self.cfg = cfg
        self.task = task

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        labels = self.task.labels
        for row in rows:
            gold = row["gold"]
            if row["status"] != OK or gold not in labels:
                continue
            if (row["teacher"] or "").startswith(GOLD_TEACHER):
                merge_scores(row, "gold", {"gold": gold, "mixed": True})
                continue
            label = row["label"]
            teachers = [
                [v["teacher"], v.get("label")]
                for v in row_votes(row)
                if v.get("response") is not None
            ]
            entry: dict[str, Any] = {"gold": gold, "label": label, "teachers": teachers}
            if label != gold:
                if self.cfg.on_disagreement == "relabel":
                    entry["relabeled_from"] = label
                    row["label"] = gold
                    row["output"] = answer_json(self.task.label_key, gold)
                elif self.cfg.on_disagreement == "drop":
                    filter_row(row, f"gold_disagreement: the teacher says {label}, gold is {gold}")
            merge_scores(row, "gold", entry)
        return rows
