"""The readable report: report.md rendered from report.json (one section per stage).

A pure function of the report's data, below every stage: the run state re-renders it each time
a stage writes its section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    out = [f"# Distillation run `{report.get('run_id', '?')}`", ""]
    if ev := report.get("evaluate"):
        out += ["## Evaluation (accuracy on gold labels)", ""]
        rows = []
        for name, ts in ev.get("test_sets", {}).items():
            acc = ts["accuracy"]
            rows.append(
                [name, ts["rows"], acc.get("student"), acc.get("teacher"), acc.get("baseline")]
            )
        out += [_table(["test set", "rows", "student", "teacher", "majority baseline"], rows), ""]
        for name, ts in ev.get("test_sets", {}).items():
            out += [f"### {name}: per class", ""]
            prow = []
            for who, per_class in ts.get("per_class", {}).items():
                for label, m in per_class.items():
                    prow.append([who, label, m["precision"], m["recall"], m["f1"], m["support"]])
            out += [_table(["model", "label", "precision", "recall", "f1", "support"], prow), ""]
            if ts.get("mistakes_file"):
                out += [
                    f"Student mistakes to read: `{ts['mistakes_file']}` ({ts.get('mistakes', 0)})",
                    "",
                ]
        if ev.get("plot"):
            out += [f"![accuracy]({Path(ev['plot']).name})", ""]
    if gen := report.get("generate"):
        out += [
            "## Generate",
            "",
            _table(
                [
                    "rows",
                    "ok",
                    "failed",
                    "teacher calls",
                    "cache hits",
                    "recorded in logs",
                    "prompt tokens",
                    "completion tokens",
                    "cost (USD)",
                    "seconds",
                ],
                [
                    [
                        gen["rows"],
                        gen["status"].get("ok", 0),
                        gen["status"].get("failed", 0),
                        gen["teacher_calls"],
                        gen.get("cache_hits", 0),
                        gen["recorded_responses"],
                        gen["prompt_tokens"],
                        gen["completion_tokens"],
                        gen.get("cost_usd", 0.0),
                        gen["seconds"],
                    ]
                ],
            ),
            "",
        ]
        if gen.get("budget_stop"):
            out += [f"**Stopped by the budget**: {gen['budget_stop']}", ""]
        if gen.get("reasons"):
            out += [_table(["reason", "rows"], sorted(gen["reasons"].items())), ""]
    if cur := report.get("curate"):
        out += [
            "## Curate",
            "",
            _table(
                ["input rows", "kept", "filtered", "failed"],
                [[cur["rows_in"], cur["kept"], cur["filtered"], cur["failed"]]],
            ),
            "",
        ]
        if cur.get("reasons"):
            out += [_table(["reason", "rows"], sorted(cur["reasons"].items())), ""]
        if cur.get("labels"):
            before = cur.get("labels_before", {})
            out += [
                _table(
                    ["label", "before", "kept"],
                    [[lab, before.get(lab, ""), n] for lab, n in sorted(cur["labels"].items())],
                ),
                "",
            ]
        if cur.get("gold") and cur["gold"]["rows"]:
            teachers = cur["gold"]["teachers"]
            out += [
                f"Against {cur['gold']['rows']} gold labels: row labels "
                f"{cur['gold']['accuracy']} correct.",
                "",
                _table(
                    ["teacher", "answers", "accuracy"],
                    [[t, v["answers"], v["accuracy"]] for t, v in sorted(teachers.items())],
                ),
                "",
            ]
        if cur.get("outputs", {}).get("card"):
            out += [f"Data card: `{cur['outputs']['card']}`", ""]
    if tr := report.get("train"):
        out += [
            "## Train",
            "",
            _table(["metric", "value"], [[k, v] for k, v in tr.get("metrics", {}).items()]),
            "",
        ]
        out += [f"Checkpoint: `{tr.get('checkpoint')}`", ""]
    if sw := report.get("sweep"):
        out += ["## Sweep", ""]
        trials = sw.get("trials", [])
        if trials:
            keys = list(trials[0]["config"].keys())
            out += [
                _table(
                    [*keys, "val_loss", "train_rows"],
                    [
                        [t["config"][k] for k in keys] + [t.get("val_loss"), t.get("train_rows")]
                        for t in trials
                    ],
                ),
                "",
            ]
        out += [
            f"Best: `{sw.get('best', {}).get('config')}` (val_loss {sw.get('best', {}).get('val_loss')})",
            "",
        ]
        if sw.get("plot"):
            out += [
                f"![dataset size ablation]({Path(sw['plot']).relative_to(Path(sw['plot']).parents[1])})",
                "",
            ]
    if sv := report.get("serve"):
        out += [
            "## Serve",
            "",
            _table(["target", "requests"], sorted(sv.get("answered_by", {}).items())),
            "",
        ]
        out += [
            f"Mode: {sv.get('mode', 'canary')}; errors: {sv.get('errors', 0)}; endpoint: "
            f"{sv.get('url')}; request log: `{sv.get('request_log')}` "
            f"({len(sv.get('request_log_files', []))} files)",
            "",
        ]
        if drift := sv.get("drift"):
            out += [
                "### Input drift against the training inputs",
                "",
                _table(
                    ["inputs served", "length PSI", "unknown words (served)", "(training)"],
                    [
                        [
                            drift["inputs"],
                            drift["length_psi"],
                            drift["unknown_word_rate"],
                            drift["train_unknown_word_rate"],
                        ]
                    ],
                ),
                "",
                f"![input drift]({Path(drift['figure']).parent.name}/{Path(drift['figure']).name})",
                "",
            ]
    return "\n".join(out) + "\n"
