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


def _in_run(path: str, parts: int) -> str:
    """A link relative to report.md: the last `parts` components of a file in the run folder
    (e.g. evaluate/balanced/mistakes.html)."""
    return "/".join(Path(path).parts[-parts:])


def _generative_section(ev: dict[str, Any]) -> list[str]:
    """Per test set one table of every model's exact match, schema adherence, ROUGE-L and
    judge score, and the link to its mistakes page."""
    judge = ev.get("judge")
    scale = f" ({judge['scale'][0]}-{judge['scale'][1]})" if judge else ""
    out = ["## Evaluation (against reference answers)", ""]
    for name, ts in ev.get("test_sets", {}).items():
        out += [f"### {name} ({ts['rows']} rows)", ""]
        rows = [
            [
                who,
                m["exact_match"],
                m["json_adherence"],
                m["rouge_l"],
                m["judge_score"],
                m["unparsed"],
            ]
            for who, m in ts["metrics"].items()
        ]
        header = ["model", "exact match", "schema adherence", "ROUGE-L", f"judge{scale}"]
        out += [_table([*header, "unparsed"], rows), ""]
        if ts.get("mistakes_page"):
            out += [
                f"[Mistakes page]({_in_run(ts['mistakes_page'], 3)}): "
                f"{ts.get('mistakes', 0)} student answers that are not exact, "
                f"{ts.get('disagreements', 0)} more where the teacher's is not.",
                "",
            ]
    out += [
        "Models: student (`" + str(ev.get("checkpoint_from", "")) + "`), teacher, "
        "frequent_answer (the most frequent training answer), echo (the input as the answer). "
        "Schema adherence is empty without task.output_schema, the judge without "
        "evaluate.judge.",
        "",
    ]
    if judge:
        out += [
            f"Judge: `{judge['model']}`, {judge['judged']} answers judged, "
            f"{judge['failed']} failed, {judge['calls']} calls, {judge['cache_hits']} cache "
            f"hits, ${judge['cost_usd']:.4f}.",
            "",
        ]
    if ev.get("plot"):
        out += [f"![ROUGE-L]({_in_run(ev['plot'], 2)})", ""]
    return out


def _evaluate_section(ev: dict[str, Any]) -> list[str]:
    """One table of every model on every test set, then per test set its per-class table,
    confusion matrices and the link to its mistakes page."""
    if ev.get("kind") == "generative":
        return _generative_section(ev)
    out = ["## Evaluation (on gold labels)", ""]
    rows = []
    for name, ts in ev.get("test_sets", {}).items():
        for who, acc in ts["accuracy"].items():
            rows.append(
                [
                    name,
                    who,
                    ts["rows"],
                    acc,
                    ts.get("balanced_accuracy", {}).get(who),
                    ts.get("roc_auc", {}).get(who),
                    ts.get("unparsed", {}).get(who),
                ]
            )
    header = ["test set", "model", "rows", "accuracy", "balanced accuracy", "ROC-AUC", "unparsed"]
    out += [_table(header, rows), ""]
    out += [
        "Models: student (`" + str(ev.get("checkpoint_from", "")) + "`), teacher, majority "
        "(the most frequent curated label), tfidf_logreg (TF-IDF + logistic regression on the "
        "student's training rows).",
        "",
    ]
    for name, ts in ev.get("test_sets", {}).items():
        out += [f"### {name}", ""]
        if ts.get("mistakes_page"):
            out += [
                f"[Mistakes page]({_in_run(ts['mistakes_page'], 3)}): "
                f"{ts.get('mistakes', 0)} student errors, "
                f"{ts.get('disagreements', 0)} more student/teacher disagreements.",
                "",
            ]
        prow = []
        for who, per_class in ts.get("per_class", {}).items():
            for label, m in per_class.items():
                prow.append([who, label, m["precision"], m["recall"], m["f1"], m["support"]])
        out += [_table(["model", "label", "precision", "recall", "f1", "support"], prow), ""]
        for who, cm in ts.get("confusion", {}).items():
            labels = cm["labels"]
            out += [
                f"Confusion matrix, {who} (rows gold, columns predicted):",
                "",
                _table(
                    ["gold / predicted", *labels],
                    [[g, *r] for g, r in zip(labels, cm["matrix"], strict=True)],
                ),
                "",
            ]
    if ev.get("plot"):
        out += [f"![accuracy]({_in_run(ev['plot'], 2)})", ""]
    return out


def _sweep_section(sw: dict[str, Any]) -> list[str]:
    """Every trial, the best (by the validation metric), the size ablation's fitted curve and
    the gain from doubling the data, the plots, where MLflow and TensorBoard logged."""
    metric = sw.get("metric", "val_loss")
    out = [f"## Sweep ({sw.get('search', 'grid')}, {sw.get('scheduler', 'fifo')})", ""]
    trials = sw.get("trials", [])
    keys = sw.get("keys") or (list(trials[0]["config"]) if trials else [])
    if trials:
        out += [
            _table(
                ["trial", *keys, "train rows", "epochs", "stopped early", metric],
                [
                    [t.get("trial")]
                    + [t["config"].get(k) for k in keys]
                    + [
                        t.get("train_rows"),
                        t.get("epochs_run"),
                        t.get("stopped_early"),
                        t.get(metric),
                    ]
                    for t in trials
                ],
            ),
            "",
        ]
    best = sw.get("best", {})
    better = "higher" if sw.get("mode") == "max" else "lower"
    out += [
        f"Best by {metric} on the validation rows ({better} is better): `{best.get('config')}` "
        f"({metric} {best.get(metric)}); checkpoint `{best.get('checkpoint')}`.",
        "",
    ]
    if sw.get("table"):
        out += [
            f"Trials table: `{_in_run(sw['table'], 2)}` and `{_in_run(sw.get('table_md', ''), 2)}`.",
            "",
        ]
    fit = (sw.get("ablation") or {}).get("fit") or {}
    if fit.get("fitted"):
        law = f"{fit['a']:.4g} * n^-{fit['b']:.3f} + {fit['c']:.4g}"
        out += [
            f"Dataset-size ablation: {metric} = "
            f"{f'1 - ({law})' if fit.get('mode') == 'max' else law} over training rows n "
            f"({fit['form']}). Doubling the training set from {fit['rows']} to "
            f"{2 * fit['rows']} rows is estimated to take {metric} from {fit['at_rows']:.4f} to "
            f"{fit['at_double_rows']:.4f} (a gain of {fit['gain_from_doubling']:.4f}).",
            "",
        ]
    elif fit:
        out += [f"Dataset-size ablation: no curve fitted ({fit.get('why')}).", ""]
    if sw.get("plot"):
        out += [f"![dataset size ablation]({_in_run(sw['plot'], 2)})", ""]
    for param, png in (sw.get("param_plots") or {}).items():
        out += [f"![{metric} by {param}]({_in_run(png, 2)})", ""]
    if sw.get("mlflow"):
        out += [f"MLflow: `mlflow ui --backend-store-uri {sw['mlflow']}`", ""]
    if sw.get("tensorboard"):
        out += [f"TensorBoard: `tensorboard --logdir {sw['tensorboard']}`", ""]
    return out


def render_markdown(report: dict[str, Any]) -> str:
    out = [f"# Distillation run `{report.get('run_id', '?')}`", ""]
    if ev := report.get("evaluate"):
        out += _evaluate_section(ev)
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
        out += _sweep_section(sw)
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
