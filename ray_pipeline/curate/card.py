"""The data card: one HTML page (dataset/card.html) with PNG plots beside it, for a person to
read what a curated dataset is made of and why rows were left out.

Plots: class balance before and after curation, input lengths of kept and dropped rows, drop
reasons; when those steps ran, near-duplicate cluster sizes, judge scores and vote agreement.
Then tables: counts, teacher accuracy against gold, subsets, diversity, the test sets, every
setting, and up to ``curate.samples_per_reason`` sample rows of each drop reason.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

CARD = "card.html"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on workers, CI or servers
    import matplotlib.pyplot as plt

    return plt


def _bars(
    path: Path, title: str, series: dict[str, dict[str, int]], horizontal: bool = False
) -> Path:
    """Grouped bars: one group per key, one bar per series."""
    plt = _plt()
    keys = sorted({k for s in series.values() for k in s}, key=str)
    fig, ax = plt.subplots(figsize=(6.4, max(2.6, 0.32 * len(keys) + 1.2) if horizontal else 3.6))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        pos = [j + i * width for j in range(len(keys))]
        heights = [values.get(k, 0) for k in keys]
        if horizontal:
            ax.barh(pos, heights, height=width, label=name)
        else:
            ax.bar(pos, heights, width=width, label=name)
    ticks = [j + width * (len(series) - 1) / 2 for j in range(len(keys))]
    if horizontal:
        ax.set_yticks(ticks, [str(k) for k in keys], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("rows")
    else:
        ax.set_xticks(
            ticks, [str(k) for k in keys], fontsize=8, rotation=30 if len(keys) > 6 else 0
        )
        ax.set_ylabel("rows")
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x" if horizontal else "y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plots(out_dir: Path, manifest: dict[str, Any]) -> list[Path]:
    """The card's PNGs, written into `out_dir`."""
    made = [
        _bars(
            out_dir / "class_balance.png",
            "Labels before and after curation",
            {"before (answered)": manifest["labels_before"], "after (kept)": manifest["labels"]},
        )
    ]
    edges = manifest["lengths"]["edges"]
    names = [
        f"<{edges[i + 1]}" if i + 1 < len(edges) else f">={edges[i]}" for i in range(len(edges))
    ]

    def named(hist: dict[str, int]) -> dict[str, int]:
        return {f"{int(k):02d} {names[int(k)]}": v for k, v in hist.items()}

    made.append(
        _bars(
            out_dir / "lengths.png",
            "Input length (characters)",
            {
                "kept": named(manifest["lengths"]["kept"]),
                "dropped": named(manifest["lengths"]["dropped"]),
            },
        )
    )
    if manifest["reasons"]:
        made.append(
            _bars(
                out_dir / "drop_reasons.png",
                "Why rows were left out",
                {"rows": manifest["reasons"]},
                True,
            )
        )
    near = manifest["steps"].get("near_dedup") or manifest["steps"].get("semantic_dedup")
    if near and near["clusters_by_size"]:
        made.append(
            _bars(
                out_dir / "clusters.png",
                "Near-duplicate clusters by size",
                {"clusters": {str(k): v for k, v in near["clusters_by_size"].items()}},
            )
        )
    judge = manifest["steps"].get("judge")
    if judge:
        made.append(_bars(out_dir / "judge_scores.png", "Judge scores", {"rows": judge["scores"]}))
    if manifest["vote"]:
        made.append(
            _bars(
                out_dir / "agreement.png",
                "Vote agreement per row",
                {"rows": manifest["vote"]["agreement"]},
            )
        )
    return made


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(
    manifest: dict[str, Any], samples: dict[str, list[dict[str, Any]]], images: list[str]
) -> str:
    """The card's HTML (`images`: PNG file names beside it)."""
    m = manifest
    counts = m["counts"]
    parts = [
        f"<h1>Data card: {html.escape(m['run_id'])}</h1>",
        f"<p>Task <b>{html.escape(m['task']['name'])}</b>, "
        + (
            f"labels {html.escape(', '.join(m['task']['labels']))}"
            if m["task"].get("labels")
            else "generative (text answers)"
        )
        + f". Content sha256 "
        f"<code>{m['content_sha256'][:16]}…</code>.</p>",
        _table(
            ["input rows", "kept", "filtered", "failed", "to review"],
            [[counts["in"], counts["ok"], counts["filtered"], counts["failed"], m["to_review"]]],
        ),
        *(f'<p><img src="{name}" alt="{name}"></p>' for name in images),
        "<h2>Drop reasons</h2>",
        _table(["reason", "rows"], sorted(m["reasons"].items())),
    ]
    gold = m["gold"]
    if gold:
        parts += [
            "<h2>Teacher against gold labels</h2>",
            f"<p>{gold['rows']} rows with gold labels: row labels {gold['accuracy']:.2%} "
            f"correct, {gold['disagreements']} disagreements, {gold['relabeled']} relabeled; "
            f"{gold['mixed_gold_rows']} gold-labelled rows mixed in.</p>"
            if gold["rows"]
            else f"<p>{gold['mixed_gold_rows']} gold-labelled rows mixed in.</p>",
            _table(
                ["teacher", "answers", "accuracy"],
                [[t, v["answers"], v["accuracy"]] for t, v in gold["teachers"].items()],
            ),
        ]
    parts += [
        "<h2>Dataset-size subsets</h2>",
        f"<p>Nested, by a hash of the row id with seed {m['subsets']['seed']} "
        "(<code>ray_pipeline.data.subsets.in_subset</code>, as train and sweep use it).</p>",
        _table(
            ["fraction", "rows", "labels"],
            [[f, v["rows"], json.dumps(v["labels"])] for f, v in m["subsets"]["fractions"].items()],
        ),
        "<h2>Diversity</h2>",
        _table(["measure", "value"], sorted(m["diversity"].items())),
        "<h2>Sources</h2>",
        _table(["source", "kept rows"], sorted(m["rows_per_source"].items())),
    ]
    tests = m["test_sets"]
    if tests["checked"] or tests["built"]:
        rows = [[t["name"], t["from"], t["rows"], t["sha256"][:16]] for t in tests["checked"]]
        rows += [
            [t["name"], f"built ({t['kind']})", t["rows"], t["sha256"][:16]]
            for t in (tests["built"] or {}).get("test_sets", [])
        ]
        parts += ["<h2>Test sets</h2>", _table(["name", "from", "rows", "sha256"], rows)]
    parts += [
        "<h2>Settings</h2>",
        f"<pre>{html.escape(json.dumps(m['settings'], indent=2))}</pre>",
        "<h2>Sample rows per drop reason</h2>",
    ]
    for head, rows in samples.items():
        parts.append(f"<h3>{html.escape(head)} ({m['reasons'].get(head, 0)} rows)</h3>")
        parts.append(
            _table(
                ["source:line", "input", "answer", "label", "gold", "reason"],
                [
                    [
                        f"{r['source']}:{r['source_line']}",
                        r["input"],
                        r["response"],
                        r["label"],
                        r["gold"],
                        r["reason"],
                    ]
                    for r in rows
                ],
            )
        )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;vertical-align:top;"
        "max-width:420px;overflow-wrap:anywhere}th{background:#f2f2f2}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Data card {html.escape(m['run_id'])}"
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )


def write_card(
    out_dir: Path, manifest: dict[str, Any], samples: dict[str, list[dict[str, Any]]]
) -> Path:
    """Write card.html and its PNGs into `out_dir` (the dataset folder)."""
    images = [p.name for p in plots(out_dir, manifest)]
    path = out_dir / CARD
    path.write_text(render(manifest, samples, images), encoding="utf-8")
    return path
