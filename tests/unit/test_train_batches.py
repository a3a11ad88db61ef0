"""The worker's batches: length grouping and packing keep the planned number of steps on every
rank; resuming skips exactly the batches trained before."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from ray_pipeline.train.loop import GROUP_WINDOW_BATCHES, _batches

torch = pytest.importorskip("torch")


class Shard:
    """A dataset shard whose batches arrive in uneven sizes (as Ray's may, around blocks)."""

    def __init__(self, rows: list[dict], sizes: list[int]):
        self.rows, self.sizes = rows, sizes

    def iter_batches(self, batch_size, batch_format, **shuffle):
        assert batch_format == "numpy"
        start = 0
        for size in self.sizes:
            part = self.rows[start : start + size]
            start += size
            yield {k: np.array([r[k] for r in part], dtype=object) for k in part[0]}
        assert start == len(self.rows)


def _rows(kind: str) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(8 * GROUP_WINDOW_BATCHES * 2 + 13):
        # Few lengths: many batches whose rows are all of one length (numpy would make
        # such a batch 2-D, not a column of sequences).
        ids = [i] * rng.choice([3, 7, 20])
        labels = ids if kind == "causal_lm" else i % 2
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _shard(rows: list[dict]) -> Shard:
    sizes = [8, 3, 8, 8, 5]  # uneven at first, then whole batches, then what is left
    while sum(sizes) < len(rows):
        sizes.append(min(8, len(rows) - sum(sizes)))
    return Shard(rows, sizes)


@pytest.mark.parametrize("kind", ["causal_lm", "classifier"])
@pytest.mark.parametrize("mode", ["grouped", "plain", "packed"])
def test_batches_number_ceil_rows_over_batch_size_whatever_arrives(kind, mode):
    rows = _rows(kind)
    batches = list(
        _batches(
            _shard(rows),
            8,
            0,
            torch.device("cpu"),
            group_seed=1 if mode == "grouped" else None,
            pack_to=64 if mode == "packed" else None,
        )
    )
    assert len(batches) == math.ceil(len(rows) / 8)
    # Every row once (its first token is its index); a packed row holds several examples.
    seen = sorted(
        int(v)
        for b, _ in batches
        for row in b["input_ids"]
        for j, v in enumerate(row)
        if (j == 0 or row[j - 1] != v) and v != 0 or (j == 0 and v == 0)
    )
    assert sum(c.examples for _, c in batches) == len(rows)
    if mode != "packed" or kind == "classifier":
        assert seen == list(range(len(rows)))
        assert all(c.examples == len(b["input_ids"]) for b, c in batches)


def test_resuming_skips_the_batches_trained_before():
    rows = _rows("causal_lm")
    every = list(_batches(_shard(rows), 8, 0, torch.device("cpu"), group_seed=1))
    rest = list(_batches(_shard(rows), 8, 0, torch.device("cpu"), group_seed=1, skip=5))
    assert all(b is None and c is None for b, c in rest[:5])
    for (b1, _), (b2, _) in zip(every[5:], rest[5:], strict=True):
        assert torch.equal(b1["input_ids"], b2["input_ids"])
