"""The dataset-size ablation plot of a sweep (PNG)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def plot_fraction_ablation(
    trials: list[dict[str, Any]], path: str | Path, metric: str = "val_loss"
) -> Path:
    """`metric` against the share of the training set, one line per combination of the other
    swept hyperparameters (x axis labelled with the rows each fraction means)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for t in trials:
        if t.get(metric) is None:
            continue
        others = {k: v for k, v in t["config"].items() if k != "fraction"}
        label = ", ".join(f"{k}={v}" for k, v in sorted(others.items())) or "train settings"
        lines[label].append((t["config"]["fraction"], t[metric], t["train_rows"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    fractions = sorted({(p[0], p[2]) for pts in lines.values() for p in pts})
    ax.set_xticks([f for f, _ in fractions], [f"{f:g}\n({rows} rows)" for f, rows in fractions])
    ax.set_xlabel("share of the training set")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title("dataset-size ablation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
