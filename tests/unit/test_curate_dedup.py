"""Dedup without Ray: exact groups, MinHash band keys, buckets, clusters and their reasons,
run end to end on planted near-duplicates exactly as the Ray steps run them per partition."""

from __future__ import annotations

import random

import numpy as np

from ray_pipeline.config import NearDedupSection
from ray_pipeline.curate.dedup import (
    PAIRS_UP_TO,
    bucket_edges,
    clusters,
    duplicate_notes,
    hyperplanes,
    jaccard,
    lsh_bands,
    mark_exact_duplicates,
    minhash_band_keys,
    minhash_signatures,
    record_order,
    shingles,
    simhash_band_keys,
    text_key,
)
from ray_pipeline.data.schema import FAILED, FILTERED, OK, new_row


def row(text, line=0, source="s", status=OK):
    return new_row(
        id=f"{source}-{text}", source=source, source_line=line, input=text, status=status
    )


def test_exact_dedup_keeps_first_by_source_and_line():
    rows = [
        row("B  x", line=3),
        row("b x", line=1),
        row("b X", line=2, source="a"),
        row("other", line=4),
        row("b x", line=5, status=FAILED),
    ]
    marked = mark_exact_duplicates(rows)
    # source "a" sorts first, so its line-2 row is the one kept.
    assert [r["status"] for r in marked] == [FILTERED, FILTERED, OK, OK, FAILED]
    assert marked[0]["reason"] == "duplicate: same input as row a-b X"
    assert text_key("B  x") == text_key("b x") != text_key("b y")


def test_verbatim_repeats_in_one_file_share_an_id_but_one_is_kept():
    a, b = row("same", line=1), row("same", line=2)
    assert a["id"] == b["id"]
    assert [r["status"] for r in mark_exact_duplicates([b, a])] == [FILTERED, OK]


def test_record_order_sorts_by_source_then_line():
    assert record_order(0, 5) < record_order(0, 6) < record_order(1, 1)
    assert record_order(0, None) < record_order(0, 0)


def test_shingles_of_chars_and_words():
    assert sorted(shingles("Ab  cd", 3, "char")) == [b" cd", b"ab ", b"b c"]
    assert sorted(shingles("one two three", 2, "word")) == [b"one two", b"two three"]
    assert shingles("hi", 5, "char") == [b"hi"]  # shorter than one n-gram


def test_band_keys_are_equal_exactly_where_a_band_is():
    sigs = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [7, 7, 3, 4]], dtype=np.uint32)
    keys = minhash_band_keys(sigs, bands=2, rows=2)
    assert keys[0, 0] == keys[1, 0] and keys[0, 1] != keys[1, 1]
    assert keys[0, 1] == keys[2, 1] and keys[0, 0] != keys[2, 0]
    # Band 0 of one row never collides with band 1 of another holding the same values.
    same = minhash_band_keys(np.array([[5, 5, 5, 5]], dtype=np.uint32), 2, 2)
    assert same[0, 0] != same[0, 1]


def test_buckets_link_every_pair_of_small_buckets_and_a_star_in_big_ones():
    keys = np.array([10, 10, 20, 10, 30, 40, 40], dtype=np.int64)
    orders = np.array([5, 2, 7, 9, 1, 4, 3], dtype=np.int64)
    a, b = bucket_edges(keys, orders)
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [(4, 3), (5, 2), (9, 2), (9, 5)]
    assert bucket_edges(np.zeros(0, np.int64), np.zeros(0, np.int64))[0].size == 0
    big = np.arange(PAIRS_UP_TO + 1, dtype=np.int64)
    a, b = bucket_edges(np.zeros_like(big), big)
    assert a.tolist() == big[1:].tolist() and set(b.tolist()) == {0}


def test_clusters_are_components_kept_at_their_first_row():
    groups = clusters(np.array([5, 9, 12]), np.array([2, 5, 11]))
    assert {x: (c.kept, c.size) for x, c in groups.items()} == {
        2: (2, 3),
        5: (2, 3),
        9: (2, 3),
        11: (11, 2),
        12: (11, 2),
    }


def test_duplicate_notes_name_the_closest_row_and_the_kept_one():
    notes = duplicate_notes(
        np.array([5, 9]),
        np.array([2, 5]),
        np.array([0.9, 0.8]),
        {2: "r2", 5: "r5", 9: "r9"},
        "near_duplicate",
        "jaccard",
    ).to_pylist()
    assert notes == [
        {
            "order": 5,
            "reason": "near_duplicate: jaccard 0.90 with row r2; row r2 kept of a cluster of 3",
            "size": 3,
        },
        {
            "order": 9,
            "reason": "near_duplicate: jaccard 0.80 with row r5; row r2 kept of a cluster of 3",
            "size": 3,
        },
    ]


def test_near_dedup_end_to_end_finds_planted_copies():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    texts = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(200)]
    planted = {}
    for i in range(20):  # one word changed in 20 copies of the first 20 texts
        copy = texts[i].split()
        copy[rng.randrange(30)] = "zzz"
        planted[len(texts)] = i
        texts.append(" ".join(copy))
    cfg = NearDedupSection(threshold=0.7)
    bands, rows = lsh_bands(cfg.threshold, cfg.num_perm)
    sigs = minhash_signatures(texts, cfg)
    keys = minhash_band_keys(sigs, bands, rows)
    orders = np.arange(len(texts), dtype=np.int64)
    a, b = bucket_edges(keys.reshape(-1), np.repeat(orders, bands))
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    sims = jaccard(sigs[pairs[:, 0]], sigs[pairs[:, 1]])
    keep = sims >= cfg.threshold
    notes = duplicate_notes(
        pairs[keep, 0], pairs[keep, 1], sims[keep], {i: f"r{i}" for i in orders.tolist()},
        "near_duplicate", "jaccard",
    ).to_pylist()  # fmt: skip
    dropped = {n["order"] for n in notes}
    assert dropped == set(planted)
    assert all(f"row r{planted[n['order']]} kept" in n["reason"] for n in notes)


def test_simhash_keys_put_close_vectors_in_one_bucket():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((3, 16)).astype(np.float32)
    v[1] = v[0] + 0.01 * rng.standard_normal(16)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    planes = hyperplanes(16, bands=4, bits=6, seed=3)
    keys = simhash_band_keys(v, planes, 4, 6)
    assert (keys[0] == keys[1]).sum() >= 3 and (keys[0] == keys[2]).sum() <= 1
    assert np.array_equal(planes, hyperplanes(16, 4, 6, 3))  # the same in every actor
