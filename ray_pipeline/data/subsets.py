"""Which rows a run uses: the nested dataset-size subsets of the ablations, decided per row.

One rule for every stage: curate records the subsets in the manifest and the data card, the
train and sweep stages train on them. By a seeded hash of the row id, so the subsets of one
seed are nested (the 50% subset is inside the 75% one), do not depend on row order or on the
rows around them, and a streaming pipeline decides row by row, on any worker.
"""

from __future__ import annotations

import hashlib


def stable_unit(*keys: object) -> float:
    """A number in [0, 1) fixed by the keys: the same in every process and every run."""
    digest = hashlib.sha256("\x00".join(map(str, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_subset(row_id: str, fraction: float, seed: int) -> bool:
    """Whether a training row belongs to the `fraction` subset of `seed` (dataset-size
    ablations). A subset holds about `fraction` of the rows, not exactly."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return fraction == 1 or stable_unit("subset", seed, row_id) < fraction


def smallest_subset(row_id: str, fractions: list[float], seed: int) -> float | None:
    """The smallest of `fractions` whose subset holds the row (it is then in every larger
    one: the subsets are nested); None when it is in none of them."""
    return next((f for f in sorted(fractions) if in_subset(row_id, f, seed)), None)
