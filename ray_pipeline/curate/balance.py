"""Balance: caps per source or user, and resampling to target label shares.

Both decide by a seeded hash of the row id, so the same rows are kept in every run. Rows are
only ever dropped (``over_cap``, ``rebalanced``), never repeated: a repeated row is a
duplicate the dedup step just removed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ray_pipeline.curate.filters import filter_row
from ray_pipeline.data.schema import OK
from ray_pipeline.data.subsets import stable_unit


def cap_rows(rows: list[dict[str, Any]], by: str, cap: int, seed: int) -> list[dict[str, Any]]:
    """Keep at most `cap` ok rows per value of `by` ('source' or 'user'), chosen by a hash of
    their ids; rows without a value are not capped. All rows of one value must be in `rows`
    (``global_steps`` partitions by the value)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["status"] == OK and row[by] is not None:
            groups[row[by]].append(row)
    for value, members in groups.items():
        if len(members) <= cap:
            continue
        members.sort(key=lambda r: (stable_unit("cap", seed, r["id"]), r["source_line"] or 0))
        for row in members[cap:]:
            filter_row(row, f"over_cap: {by} {value!r} has {len(members)} rows > cap {cap}")
    return rows


def keep_shares(counts: dict[str, int], target: dict[str, float]) -> dict[str, float]:
    """{label: share of its rows to keep} so that the kept rows have the `target` shares
    with as many rows as possible (labels not in `target` are dropped)."""
    usable = {lab: n for lab, n in counts.items() if n > 0 and target.get(lab, 0) > 0}
    if not usable:
        return dict.fromkeys(counts, 0.0)
    total = min(n / target[lab] for lab, n in usable.items())
    return {
        lab: min(1.0, total * target.get(lab, 0) / n) if n else 0.0 for lab, n in counts.items()
    }


def quotas(counts: dict[str, int], target: dict[str, float]) -> dict[str, int]:
    """{label: rows to keep} for the `target` shares (``keep_shares``, rounded)."""
    return {lab: round(share * counts[lab]) for lab, share in keep_shares(counts, target).items()}


def balance_draw(row: dict[str, Any], seed: int) -> float:
    """The row's draw: each label keeps its rows of smallest draw."""
    return stable_unit("balance", seed, row["id"], row["source"], row["source_line"])


def resample(
    rows: list[dict[str, Any]], cuts: dict[str, float], target: dict[str, float], seed: int
) -> list[dict[str, Any]]:
    """Drop ok rows of over-represented labels (``rebalanced``): a label keeps the rows whose
    draw is at most its cut (the stage finds the cut that keeps exactly its quota)."""
    for row in rows:
        if row["status"] != OK:
            continue
        cut = cuts.get(row["label"], -1.0)
        if cut < 1.0 and balance_draw(row, seed) > cut:
            filter_row(
                row,
                f"rebalanced: label {row['label']} over its target share of "
                f"{target.get(row['label'], 0):g}",
            )
    return rows
