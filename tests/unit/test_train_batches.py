"""The worker's batches: length grouping keeps the planned number of steps on every rank."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from ray_pipeline.train.loop import GROUP_WINDOW_BATCHES, PadCollate, _batches

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


@pytest.mark.parametrize("kind", ["causal_lm", "classifier"])
def test_grouped_batches_number_ceil_rows_over_batch_size_whatever_arrives(kind):
    rng = random.Random(0)
    rows = []
    for i in range(8 * GROUP_WINDOW_BATCHES * 2 + 13):
        # Few lengths: many batches whose rows are all of one length (numpy would make
        # such a batch 2-D, not a column of sequences).
        ids = [i] * rng.choice([3, 7, 20])
        labels = ids if kind == "causal_lm" else i % 2
        rows.append({"input_ids": ids, "labels": labels})
    sizes = [8, 3, 8, 8, 5]  # uneven at first, then whole batches, then what is left
    while sum(sizes) < len(rows):
        sizes.append(min(8, len(rows) - sum(sizes)))
    shard = Shard(rows, sizes)
    batches = list(_batches(shard, PadCollate(0), 8, torch.device("cpu"), group_seed=1))
    assert len(batches) == math.ceil(len(rows) / 8)
    seen = sorted(int(b["input_ids"][j, 0]) for b, _ in batches for j in range(len(b["input_ids"])))
    assert seen == list(range(len(rows)))
    assert all(counts[0] == len(b["input_ids"]) for b, counts in batches)
