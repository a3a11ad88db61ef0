"""The LLM Distillation Playbook's Jigsaw case study, reproduced from its recorded GPT-4 logs.

Each of the playbook's training sets A-E (configs/jigsaw_set_{a..e}.yaml) goes through the
whole loop up to evaluate: generate (the recorded answers, no teacher call), curate, train
(the MiniLM classifier student), evaluate on test.balanced and test.indist (student, GPT-4
replayed by the simulator, majority baseline). Then the dataset-size ablation on E: the same
config on nested subsets of E's training rows (train.data_fraction), the same test sets.

Writes into the output folder: reproduction.md and reproduction.csv (every set beside the
playbook's published balanced-test accuracy), reproduction.png (bars), ablation.csv and
ablation.png (test accuracy against training rows, with a fitted saturating power law and the
gain it predicts from doubling the data), timing in both tables. ``jobs/jigsaw.py`` runs it.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ray_pipeline.config import DistillConfig, load_config

log = logging.getLogger("distill.jigsaw")

SETS = ("a", "b", "c", "d", "e")
# Ours, beside the playbook's: C plus D's 1,000 gold toxic rows (configs/jigsaw_set_c_gold.yaml);
# B and E gold-filtered plus D's gold toxic rows (configs/jigsaw_set_cde.yaml).
EXTRA_SETS = ("c_gold", "cde")
DATA_DIR = "../shared/data/jigsaw"  # as the shipped configs name it
# The playbook's published student accuracy on the balanced test set, % (its data README);
# D has none. Its students were 7B-13B LoRA models on GPUs.
PUBLISHED = {"a": 87.2, "b": 90.0, "c": 92.0, "d": None, "e": 90.2}
PUBLISHED_TEACHER = 88.8  # GPT-4 zero-shot, balanced
PUBLISHED_BEST = 92.7  # Llama-2-13B LoRA on 10k teacher labels, balanced
TEST_SETS = ("balanced", "indist")


@dataclass
class SetResult:
    """One trained and evaluated student."""

    name: str  # "a".."e", or "e@0.25" in the ablation
    run_dir: str
    train_rows: int
    # test set -> {"student", "teacher", "majority", "tfidf_logreg"}: the evaluate stage's keys
    accuracy: dict[str, dict[str, float]]
    threshold: float | None
    fit_seconds: float
    seconds: float  # the whole run (generate .. evaluate)
    # test set -> the student's accuracy at the untuned 0.5 (what the tuned threshold changed)
    untuned: dict[str, float | None] = field(default_factory=dict)


def set_config(
    root: Path,
    key: str,
    data_dir: str,
    output_dir: str,
    overrides: list[str],
    limit: int | None = None,
) -> DistillConfig:
    """configs/jigsaw_set_<key>.yaml with the data folder at `data_dir`, runs under
    `output_dir`, serving off, and the `overrides` (``--set`` style) applied. With `limit`,
    only the first `limit` rows of each log and each test set (smoke runs)."""
    text = (root / "configs" / f"jigsaw_set_{key}.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text.replace(DATA_DIR, data_dir))
    if limit is not None:
        for section in (*data["data"]["logs"], *data["evaluate"]["test_sets"]):
            section["limit"] = min(section.get("limit") or limit, limit)
    base = [f"run.output_dir={output_dir}", "serve.enabled=false"]
    return load_config(data=data, overrides=[*base, *overrides])


def untuned_accuracy(predictions: Path, positive: str) -> float | None:
    """The student's accuracy on a test set had it said `positive` at probability >= 0.5
    (the untuned threshold), from the evaluate stage's student_predictions.parquet; None when
    it has no probabilities (not a classifier)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(predictions, columns=["gold", "scores"]).to_pylist()
    right = 0
    for r in rows:
        probs = json.loads(r["scores"] or "{}").get("probs")
        if not probs:
            return None
        right += (probs[positive] >= 0.5) == (r["gold"] == positive)
    return right / len(rows) if rows else None


def run_set(cfg: DistillConfig, name: str, run_id: str) -> SetResult:
    """The loop up to evaluate in runs/<run_id>; its numbers from the run's report.json."""
    from ray_pipeline.pipeline import run_all

    started = time.perf_counter()
    run = run_all(cfg, run_id, until="evaluate")
    report = json.loads(run.paths.report_json.read_text())
    train, evaluate = report["train"], report["evaluate"]
    accuracy = {
        ts: {who: float(v) for who, v in evaluate["test_sets"][ts]["accuracy"].items()}
        for ts in TEST_SETS
    }
    threshold = train.get("threshold") or {}
    untuned = {
        ts: untuned_accuracy(
            run.paths.evaluate / ts / "student_predictions.parquet", threshold["positive_label"]
        )
        if threshold
        else None
        for ts in TEST_SETS
    }
    result = SetResult(
        name=name,
        run_dir=str(run.dir),
        train_rows=int(train["metrics"]["train_rows"]),
        accuracy=accuracy,
        threshold=threshold.get("value"),
        fit_seconds=float(train["metrics"]["fit_seconds"]),
        seconds=round(time.perf_counter() - started, 1),
        untuned=untuned,
    )
    log.info("set %s: %s", name, result)
    return result


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _round_pct(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 2)


def table_rows(results: list[SetResult]) -> list[dict[str, Any]]:
    """One row per set: the student's and teacher's accuracy on both test sets (%), the
    playbook's published figure, training rows, threshold and times."""
    rows = []
    for r in results:
        rows.append(
            {
                "set": r.name.upper(),
                "train_rows": r.train_rows,
                "student_balanced": round(100 * r.accuracy["balanced"]["student"], 2),
                "student_indist": round(100 * r.accuracy["indist"]["student"], 2),
                # the playbook published whole sets only: none for an ablation's subset (e@0.5)
                "playbook_balanced": PUBLISHED.get(r.name),
                "teacher_balanced": round(100 * r.accuracy["balanced"].get("teacher", 0), 2),
                "teacher_indist": round(100 * r.accuracy["indist"].get("teacher", 0), 2),
                "majority_indist": round(100 * r.accuracy["indist"]["majority"], 2),
                "threshold": None if r.threshold is None else round(r.threshold, 4),
                "balanced_at_0.5": _round_pct(r.untuned.get("balanced")),
                "indist_at_0.5": _round_pct(r.untuned.get("indist")),
                "fit_s": round(r.fit_seconds),
                "run_s": round(r.seconds),
                "run_dir": r.run_dir,
            }
        )
    return rows


def orderings(results: list[SetResult]) -> dict[str, bool]:
    """The playbook's claims on the balanced test set, as measured: A < B < C and A < E."""
    acc = {r.name: r.accuracy["balanced"]["student"] for r in results}
    out = {}
    if {"a", "b", "c"} <= acc.keys():
        out["A < B < C"] = acc["a"] < acc["b"] < acc["c"]
    if {"a", "e"} <= acc.keys():
        out["A < E"] = acc["a"] < acc["e"]
    return out


def targets(results: list[SetResult]) -> dict[str, Any]:
    """The issue's targets: >= 92.7% balanced and above GPT-4's in-distribution accuracy (the
    teacher measured here, 90.9%) by one student. Every set that meets both is listed; the
    student reported is the first of those in run order, else the best on the balanced set."""
    goal = PUBLISHED_BEST / 100 - 1e-9

    def meets(r: SetResult) -> bool:
        teacher = r.accuracy["indist"].get("teacher")
        return (
            r.accuracy["balanced"]["student"] >= goal
            and teacher is not None
            and r.accuracy["indist"]["student"] > teacher
        )

    met_by = [r for r in results if meets(r)]
    best = met_by[0] if met_by else max(results, key=lambda r: r.accuracy["balanced"]["student"])
    return {
        "best_set": best.name.upper(),
        "balanced": best.accuracy["balanced"]["student"],
        "indist": best.accuracy["indist"]["student"],
        "balanced_target": PUBLISHED_BEST / 100,
        "indist_target": best.accuracy["indist"].get("teacher"),
        "met": bool(met_by),
        "met_by": [r.name.upper() for r in met_by],
    }


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("" if r[c] is None else str(r[c]) for c in columns) + " |")
    return "\n".join(lines)


def plot_sets(rows: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars per set: the student on both test sets and the playbook's figure, with
    GPT-4's balanced and in-distribution accuracy as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["set"] for r in rows]
    series = [
        ("student, balanced", "student_balanced"),
        ("student, in-distribution", "student_indist"),
        ("playbook student, balanced", "playbook_balanced"),
    ]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(series)
    for i, (label, key) in enumerate(series):
        vals = [r[key] or 0.0 for r in rows]
        bars = ax.bar([x + i * width for x in range(len(names))], vals, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    ax.axhline(rows[0]["teacher_balanced"], ls="--", c="grey", lw=1, label="GPT-4, balanced")
    ax.axhline(rows[0]["teacher_indist"], ls=":", c="black", lw=1, label="GPT-4, in-dist.")
    ax.axhline(PUBLISHED_BEST, ls="-.", c="red", lw=1, label="playbook best (13B), balanced")
    ax.set_xticks([x + width for x in range(len(names))], names)
    ax.set_ylim(80, 100)
    ax.set_ylabel("accuracy, %")
    ax.legend(fontsize=6, loc="lower right", ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def fit_power_law(rows: list[float], accs: list[float]) -> dict[str, float] | None:
    """Error = a * rows^-b + c (saturating power law) fitted to (rows, accuracy); with the
    accuracy it predicts at twice the largest size. None with fewer than 3 points or no fit."""
    import numpy as np
    from scipy.optimize import curve_fit

    if len(rows) < 3:
        return None
    x, err = np.asarray(rows, float), 1 - np.asarray(accs, float)

    def law(n: Any, a: float, b: float, c: float) -> Any:
        return a * np.power(n, -b) + c

    try:
        (a, b, c), _ = curve_fit(
            law, x, err, p0=(1.0, 0.5, max(0.0, err.min() / 2)), bounds=([0, 0, 0], [1e4, 3, 1])
        )
    except RuntimeError as e:  # scipy found no fit in its iterations: report none
        log.warning("no power-law fit: %s", e)
        return None
    top = x.max()
    return {
        "a": float(a),
        "b": float(b),
        "c": float(c),
        "accuracy_at_double": float(1 - law(2 * top, a, b, c)),
        "gain_from_doubling": float(law(top, a, b, c) - law(2 * top, a, b, c)),
    }


def plot_ablation(points: list[SetResult], fits: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5, 3.4))
    xs = [p.train_rows for p in points]
    for ts, marker in zip(TEST_SETS, ("o", "s"), strict=True):
        ys = [100 * p.accuracy[ts]["student"] for p in points]
        line = ax.plot(xs, ys, marker, label=f"student, {ts}")[0]
        fit = fits.get(ts)
        if fit:
            grid = np.linspace(min(xs), 2 * max(xs), 100)
            ax.plot(
                grid,
                100 * (1 - (fit["a"] * grid ** -fit["b"] + fit["c"])),
                "--",
                c=line.get_color(),
                lw=1,
            )
    ax.set_xlabel("training rows (nested subsets of E)")
    ax.set_ylabel("accuracy, %")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def reproduce(
    root: Path,
    out: Path,
    *,
    data_dir: str = DATA_DIR,
    sets: tuple[str, ...] = SETS,
    fractions: tuple[float, ...] = (0.25, 0.5),
    overrides: list[str] | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Train and evaluate the student on every set, then the size ablation on E (its full
    run is the 1.0 point); write the tables and plots into `out`; return the summary.
    `overrides` apply to every run; `limit` cuts every log and test set (smoke runs)."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    runs = str(out / "runs")
    overrides = list(overrides or [])
    results = []
    for key in sets:
        cfg = set_config(root, key, data_dir, runs, overrides, limit)
        results.append(run_set(cfg, key, f"jigsaw-set-{key.replace('_', '-')}"))
    rows = table_rows(results)
    summary: dict[str, Any] = {
        "overrides": overrides,
        "sets": rows,
        "orderings": orderings(results),
        "targets": targets(results),
    }
    write_csv(rows, out / "reproduction.csv")
    plot_sets(rows, out / "reproduction.png")
    ablation: list[SetResult] = []
    if fractions and "e" in sets:
        for f in sorted(fractions):
            fraction = [*overrides, f"train.data_fraction={f}"]
            cfg = set_config(root, "e", data_dir, runs, fraction, limit)
            ablation.append(run_set(cfg, f"e@{f}", f"jigsaw-set-e-{f}"))
        ablation.append(next(r for r in results if r.name == "e"))
        fits = {
            ts: fit_power_law(
                [p.train_rows for p in ablation], [p.accuracy[ts]["student"] for p in ablation]
            )
            for ts in TEST_SETS
        }
        arows = table_rows(ablation)
        write_csv(arows, out / "ablation.csv")
        plot_ablation(ablation, fits, out / "ablation.png")
        summary["ablation"] = {"points": arows, "fits": fits}
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "reproduction.json").write_text(json.dumps(summary, indent=2))
    (out / "reproduction.md").write_text(markdown_report(summary))
    log.info("reproduction written to %s in %.0f s", out, summary["seconds"])
    return summary


def markdown_report(summary: dict[str, Any]) -> str:
    cols = [
        "set",
        "train_rows",
        "student_balanced",
        "playbook_balanced",
        "student_indist",
        "teacher_balanced",
        "teacher_indist",
        "majority_indist",
        "threshold",
        "balanced_at_0.5",
        "indist_at_0.5",
        "fit_s",
        "run_s",
    ]
    t = summary["targets"]
    lines = [
        "# Jigsaw reproduction (LLM Distillation Playbook)",
        "",
        "Accuracy in % on the playbook's test sets; the student is all-MiniLM-L6-v2 (22M "
        "parameters) fine-tuned as a classifier on CPU; the playbook's students were 7B-13B "
        f"LoRA models (its best: {PUBLISHED_BEST} balanced). Overrides: "
        f"`{' '.join(summary['overrides']) or 'none'}`. `threshold`: the student's decision "
        "threshold, chosen on validation rows (never a test set); `*_at_0.5`: the same student "
        "at the untuned 0.5, i.e. what the threshold changed.",
        "",
        markdown_table(summary["sets"], cols),
        "",
        "![sets](reproduction.png)",
        "",
        f"Best student: set {t['best_set']}, balanced {100 * t['balanced']:.2f}% (target "
        f">= {100 * t['balanced_target']:.1f}), in-distribution {100 * t['indist']:.2f}% "
        f"(target > GPT-4's {_pct(t['indist_target'])}): "
        f"{'met' if t['met'] else 'NOT met'}.",
        "",
        "Playbook orderings (balanced): "
        + ", ".join(
            f"{k}: {'holds' if v else 'does not hold'}" for k, v in summary["orderings"].items()
        ),
    ]
    if "ablation" in summary:
        ab = summary["ablation"]
        lines += [
            "",
            "## Dataset-size ablation on E",
            "",
            markdown_table(
                ab["points"], ["set", "train_rows", "student_balanced", "student_indist", "fit_s"]
            ),
            "",
            "![ablation](ablation.png)",
            "",
        ]
        for ts, fit in ab["fits"].items():
            if fit is None:
                lines.append(f"- {ts}: no saturating power-law fit")
            else:
                lines.append(
                    f"- {ts}: error = {fit['a']:.3g} n^-{fit['b']:.3g} + {fit['c']:.3g}; "
                    f"doubling the data: {100 * fit['accuracy_at_double']:.1f}% "
                    f"({100 * fit['gain_from_doubling']:+.2f} points)"
                )
    lines += ["", f"Whole reproduction: {summary['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)
