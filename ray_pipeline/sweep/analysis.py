"""A sweep's plain parts, testable without Ray: its points, the trials table, the best trial
and the dataset-size ablation's fitted curve."""

from __future__ import annotations

import csv
import itertools
import math
import warnings
from pathlib import Path
from typing import Any

from ray_pipeline.config import SweepSection, TrainSection

# Sweep parameter -> path of the train field it replaces.
PARAMS: dict[str, tuple[str, ...]] = {
    "learning_rate": ("learning_rate",),
    "batch_size": ("batch_size",),
    "epochs": ("epochs",),
    "lora_r": ("lora", "r"),
    "lora_alpha": ("lora", "alpha"),
}
BASELINE = "baseline"  # one_at_a_time: the trial with every parameter at its train value


def baseline_values(train: TrainSection, names: list[str]) -> dict[str, Any]:
    """The train section's value of each sweep parameter in `names`."""
    data = train.model_dump(mode="json")
    out = {}
    for name in names:
        node: Any = data
        for part in PARAMS[name]:
            node = node[part]
        out[name] = node
    return out


def one_at_a_time_points(sweep: SweepSection, train: TrainSection) -> list[dict[str, Any]]:
    """The baseline (every swept parameter at its train value), then for each swept parameter
    each listed value that differs from the baseline, the others at the baseline. Each point
    holds every swept parameter and ``varied``: the one it changes (or 'baseline')."""
    base = baseline_values(train, sweep.swept)
    points = [{**base, "varied": BASELINE}]
    for name in sweep.swept:
        for value in getattr(sweep, name):
            if value != base[name]:
                points.append({**base, name: value, "varied": name})
    return points


def grid_points(sweep: SweepSection) -> list[dict[str, Any]]:
    """Every combination of the listed values (what Tune's grid_search expands to)."""
    axes = {n: getattr(sweep, n) for n in sweep.swept}
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def trial_train_section(base: TrainSection, params: dict[str, Any]) -> TrainSection:
    """`base` with the trial's values of the sweep parameters put in (validated like any train
    section); keys that are not sweep parameters (fraction, varied) are ignored."""
    data = base.model_dump(mode="json")
    for name, value in params.items():
        if name not in PARAMS:
            continue
        *parents, leaf = PARAMS[name]
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = value
    return TrainSection.model_validate(data)


def better(a: float, b: float, mode: str) -> bool:
    """Whether metric value `a` beats `b` (mode 'min': lower is better, 'max': higher)."""
    return a < b if mode == "min" else a > b


def pick_best(trials: list[dict[str, Any]], metric: str, mode: str = "min") -> dict[str, Any]:
    """The trial with the best `metric` (lowest for mode 'min', a loss; highest for 'max', an
    accuracy); ties: the first."""
    scored = [t for t in trials if t.get(metric) is not None]
    if not scored:
        raise RuntimeError(f"no sweep trial reported {metric}")
    best = scored[0]
    for t in scored[1:]:
        if better(t[metric], best[metric], mode):
            best = t
    return best


TABLE_COLUMNS = ["train_rows", "epochs_run", "stopped_early", "train_loss", "val_loss"]


def write_tables(
    trials: list[dict[str, Any]], keys: list[str], csv_path: Path, md_path: Path
) -> tuple[Path, Path]:
    """Every trial, one row each (its swept values, rows, epochs, losses, val_accuracy when
    the trials reported it, checkpoint), as CSV and as a Markdown table."""
    columns = TABLE_COLUMNS + (
        ["val_accuracy"] if any(t.get("val_accuracy") is not None for t in trials) else []
    )
    header = ["trial", *keys, *columns, "checkpoint"]
    rows = [
        [t["trial"], *(t["config"].get(k) for k in keys), *(t.get(c) for c in columns)]
        + [t.get("checkpoint")]
        for t in trials
    ]
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header[:-1]) + " |", "|" + "---|" * (len(header) - 1)]
    lines += ["| " + " | ".join(cell(v) for v in row[:-1]) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def saturating_power_law(n: Any, a: float, b: float, c: float) -> Any:
    """loss(n) = a * n^-b + c: falls with more rows, levels off at c (the irreducible loss)."""
    return a * n ** (-b) + c


def fitted_value(fit: dict[str, Any], n: float) -> float:
    """The fitted curve's metric at `n` training rows (for a 'max' metric, an accuracy, the
    law is fitted to its complement, the error rate: value = 1 - law)."""
    law = float(saturating_power_law(n, fit["a"], fit["b"], fit["c"]))
    return 1.0 - law if fit.get("mode") == "max" else law


def fit_size_curve(rows: list[int], values: list[float], mode: str = "min") -> dict[str, Any]:
    """Fit ``saturating_power_law`` to (training rows, metric) points (least squares, a, b,
    c >= 0) and estimate what doubling the largest training set would gain. For mode 'max'
    (an accuracy, a share in [0, 1]) the law is fitted to 1 - value, the error rate, which
    falls with more rows like a loss. With two points only the pure power law (c = 0) is
    fitted; with one, nothing. gain_from_doubling is positive when more data helps."""
    from scipy.optimize import OptimizeWarning, curve_fit

    if mode == "max":
        values = [1.0 - v for v in values]
    points = sorted(zip(rows, values, strict=True))
    if len({n for n, _ in points}) < 2:
        return {"fitted": False, "why": "needs at least two dataset sizes"}
    n = [float(p[0]) for p in points]
    y = [float(p[1]) for p in points]
    n_max = n[-1]
    if len(points) == 2:
        b = math.log(y[0] / y[1]) / math.log(n[1] / n[0]) if y[0] > 0 and y[1] > 0 else 0.0
        b = max(b, 0.0)
        params = (y[1] * n_max**b, b, 0.0)
        form = "a * n^-b (two sizes: no plateau fitted)"
    else:
        # Start from a plateau just below the smallest loss seen and the slope between the ends.
        c0 = max(min(y) * 0.9, 0.0)
        b0 = max(math.log((y[0] - c0) / max(y[-1] - c0, 1e-9)) / math.log(n_max / n[0]), 0.1)
        a0 = (y[0] - c0) * n[0] ** b0
        try:
            with warnings.catch_warnings():
                # Three sizes, three parameters: no covariance to estimate, and none is used.
                warnings.simplefilter("ignore", OptimizeWarning)
                params, _ = curve_fit(
                    saturating_power_law,
                    n,
                    y,
                    p0=(a0, b0, c0),
                    bounds=([0.0, 0.0, 0.0], [math.inf, 5.0, math.inf]),
                    maxfev=20000,
                )
        except RuntimeError as e:  # scipy: the least-squares search did not converge
            return {"fitted": False, "why": f"the fit did not converge: {e}"}
        form = "a * n^-b + c"
    a, b, c = (float(p) for p in params)
    fit = {"fitted": True, "mode": mode, "a": a, "b": b, "c": c, "rows": int(n_max)}
    at_max, at_double = fitted_value(fit, n_max), fitted_value(fit, 2 * n_max)
    return {
        **fit,
        "form": f"1 - ({form})" if mode == "max" else form,
        "at_rows": at_max,
        "at_double_rows": at_double,
        "gain_from_doubling": at_double - at_max if mode == "max" else at_max - at_double,
    }


def ablation_points(
    trials: list[dict[str, Any]], metric: str, mode: str = "min"
) -> list[tuple[float, int, float]]:
    """(fraction, training rows, best metric of the trials at that fraction) per fraction:
    the dataset-size curve, each size at its best settings."""
    best: dict[float, tuple[int, float]] = {}
    for t in trials:
        value = t.get(metric)
        if value is None:
            continue
        f = t["config"]["fraction"]
        if f not in best or better(value, best[f][1], mode):
            best[f] = (t["train_rows"], value)
    return [(f, rows, v) for f, (rows, v) in sorted(best.items())]
