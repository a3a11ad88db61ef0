"""A sweep's plots (PNG): the dataset-size ablation with its fitted curve, and the metric
against each swept parameter."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from ray_pipeline.sweep.analysis import BASELINE, better, fitted_value


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, x: str, metric: str, title: str, path: str | Path) -> Path:
    """Label, grid and legend the axes, write the PNG and free the figure."""
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_fraction_ablation(
    points: list[tuple[float, int, float]],
    fit: dict[str, Any],
    path: str | Path,
    metric: str = "val_loss",
    mode: str = "min",
) -> Path:
    """`metric` against training rows (each size's best trial), the fitted curve, and the
    point the fit expects at twice the largest training set."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[1] for p in points], [p[2] for p in points], "o", label="best trial per size")
    for f, rows, value in points:
        ax.annotate(f"{f:g}", (rows, value), textcoords="offset points", xytext=(4, 4))
    if fit.get("fitted"):
        lo, hi = points[0][1], 2 * fit["rows"]
        xs = [lo + (hi - lo) * i / 100 for i in range(101)]
        ax.plot(
            xs,
            [fitted_value(fit, x) for x in xs],
            "-",
            label=f"fit {fit['form']}: b={fit['b']:.2f}, c={fit['c']:.3g}",
        )
        ax.plot([hi], [fit["at_double_rows"]], "x", markersize=9, label="doubled data (fit)")
    better_way = "higher" if mode == "max" else "lower"
    title = f"dataset-size ablation ({better_way} is better)"
    return _finish(plt, fig, ax, "training rows", metric, title, path)


def plot_parameter(
    trials: list[dict[str, Any]],
    param: str,
    path: str | Path,
    metric: str = "val_loss",
    mode: str = "min",
) -> Path:
    """`metric` against one parameter's values, a line per dataset fraction. In a
    one-at-a-time sweep only the trials that vary this parameter and the baseline count."""
    plt = _pyplot()
    lines: dict[float, dict[Any, float]] = defaultdict(dict)
    for t in trials:
        cfg = t["config"]
        if t.get(metric) is None or cfg.get("varied", param) not in (param, BASELINE):
            continue
        x = cfg[param]
        best = lines[cfg["fraction"]].get(x)
        if best is None or better(t[metric], best, mode):
            lines[cfg["fraction"]][x] = t[metric]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for fraction, values in sorted(lines.items()):
        xs = sorted(values)
        ax.plot(xs, [values[x] for x in xs], marker="o", label=f"fraction {fraction:g}")
    if param == "learning_rate":
        ax.set_xscale("log")
    title = f"{metric} by {param} (best per value)"
    return _finish(plt, fig, ax, param, metric, title, path)
