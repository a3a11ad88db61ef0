"""The data card's numbers (Stats: per block, merged) and the card itself."""

from __future__ import annotations

import random

from ray_pipeline.curate import card
from ray_pipeline.curate.stats import Stats, StatsConfig, reason_head
from ray_pipeline.data.manifest import content_hash
from ray_pipeline.data.schema import FILTERED, OK, dumps, new_row
from ray_pipeline.data.subsets import in_subset, smallest_subset
from ray_pipeline.train.data import in_subset as train_in_subset

CFG = StatsConfig(labels=["0", "1"], fractions=[0.25, 0.5, 1.0], seed=3, samples=2)


def rows(n: int = 40) -> list[dict]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        status, reason = (OK, None) if i % 4 else (FILTERED, f"too_short: {i} chars < 5")
        gold = {"gold": "1", "label": "1" if i % 8 else "0", "teachers": [["t", "1"]]}
        out.append(
            new_row(
                id=f"r{i}",
                source="s",
                source_line=i,
                input=" ".join(rng.choice("abcdef") for _ in range(5)),
                label="1" if i % 3 else "0",
                status=status,
                reason=reason,
                teacher="t",
                scores=dumps({"gold": gold, "judge": {"score": 1 + i % 5, "cost": 0.5}}),
            )
        )
    return out


def test_stats_merged_over_blocks_equal_stats_over_all_rows():
    data = rows()
    whole = Stats(CFG).add(data)
    parts = (
        Stats(CFG)
        .add(data[:13])
        .merge(Stats(CFG).add(data[13:29]))
        .merge(Stats(CFG).add(data[29:]))
    )
    for name in ("status", "reasons", "labels", "lengths_kept", "gold", "judge", "confusion"):
        assert getattr(parts, name) == getattr(whole, name), name
    assert parts.sample_rows() == whole.sample_rows()
    assert parts.distinct_ngrams() == whole.distinct_ngrams()
    assert parts.subset_table() == whole.subset_table()
    assert parts.gold_summary() == whole.gold_summary()
    kept = [r for r in data if r["status"] == OK]
    assert whole.content_sha256() == content_hash([(r["id"], r["label"]) for r in kept])
    assert len(whole.sample_rows()["too_short"]) == 2  # at most `samples` per reason
    assert whole.judge_cost == 20.0


def test_subsets_are_nested_and_the_train_stages_rule():
    assert train_in_subset is in_subset  # one definition, below both stages
    ids = [f"id{i}" for i in range(2000)]
    quarter = {i for i in ids if in_subset(i, 0.25, 7)}
    half = {i for i in ids if in_subset(i, 0.5, 7)}
    assert quarter < half and 400 < len(quarter) < 600
    assert all(smallest_subset(i, [0.25, 0.5, 1.0], 7) == 0.25 for i in quarter)
    table = (
        Stats(StatsConfig(["0"], [0.25, 0.5, 1.0], 7, 0))
        .add([new_row(id=i, input="x", label="0") for i in ids])
        .subset_table()
    )
    assert table["0.25"]["rows"] == len(quarter) and table["0.5"]["rows"] == len(half)
    assert table["1"] == {"rows": 2000, "labels": {"0": 2000}}


def test_gold_summary_counts_each_teacher():
    summary = Stats(CFG).add(rows()).gold_summary()
    assert summary["rows"] == 40 and summary["accuracy"] == 0.875  # label 0 on every 8th row
    assert summary["teachers"] == {"t": {"answers": 40, "accuracy": 1.0}}
    assert summary["confusion"] == {"0|1": 5, "1|1": 35}


def test_reason_head():
    assert reason_head("too_short: 3 chars < 5") == "too_short" and reason_head(None) == "unknown"


def test_card_renders_plots_and_escaped_samples(tmp_path):
    stats = Stats(CFG).add(rows())
    manifest = {
        "run_id": "r<1>",
        "task": {"name": "toxicity", "labels": ["0", "1"]},
        "content_sha256": stats.content_sha256(),
        "counts": {"in": 40, "ok": 30, "filtered": 10, "failed": 0},
        "to_review": 0,
        "reasons": dict(stats.reasons),
        "labels": dict(stats.labels),
        "labels_before": {"0": 14, "1": 26},
        "lengths": {"edges": [0, 16, 32], "kept": {"0": 30}, "dropped": {"0": 10}},
        "steps": {
            "near_dedup": {"clusters_by_size": {2: 3}},
            "judge": {"scores": {"1": 3, "5": 9}},
        },
        "vote": None,
        "gold": stats.gold_summary(),
        "subsets": {"seed": 3, "fractions": stats.subset_table()},
        "diversity": stats.distinct_ngrams(),
        "rows_per_source": {"s": 30},
        "test_sets": {"checked": [], "built": None},
        "settings": {"rules": {"deny_patterns": ["<script>"]}},
    }
    samples = {
        "too_short": [dict(r, input="<b>bold</b>") for r in stats.sample_rows()["too_short"]]
    }
    path = card.write_card(tmp_path, manifest, samples)
    text = path.read_text()
    for png in (
        "class_balance.png",
        "lengths.png",
        "drop_reasons.png",
        "clusters.png",
        "judge_scores.png",
    ):
        assert (tmp_path / png).stat().st_size > 1000 and f'src="{png}"' in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and "<b>bold</b>" not in text
    assert "&lt;script&gt;" in text and "Data card: r&lt;1&gt;" in text
    assert "87.50% correct" in text
