"""Duplicates: exact (normalised text), near (MinHash LSH, datasketch) and semantic (embedding
LSH), as plain functions over row lists and Arrow tables; ``global_steps`` runs them on Ray.

Rows are ordered by their record, ``(source, source_line)``: the first row of a group of
duplicates is kept, so the representative is the same in every run whatever the order rows
arrive in, and every dropped row names the id of the row kept for it.

Near and semantic dedup are one algorithm with two signatures:

1. each row gets a signature (MinHash values of its shingles; an embedding) and ``b`` band
   keys (a hash of each band of the MinHash values; ``bits`` signs of random hyperplanes);
2. rows sharing a band key are candidates: each links to the first row of its bucket
   (``bucket_edges``), and with ``verify`` a link counts only when the two signatures are
   similar enough (estimated Jaccard; cosine);
3. linked rows form clusters (connected components, ``clusters``); the first row of each is
   kept, every other one is dropped naming the kept row and its closest linked neighbour.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ray_pipeline.config import NearDedupSection
from ray_pipeline.data.schema import FILTERED, OK

# Positions of a row in the global order: a rank of its source, then its line.
_LINE_BITS = 40
_WORD = re.compile(r"\w+")
# Band keys are polynomial hashes of a band's values with these fixed odd multipliers.
_BAND_MULTIPLIERS = np.random.default_rng(20240611).integers(1, 2**63, 1024, dtype=np.uint64) | 1


def normalize_text(text: str) -> str:
    """The key two inputs share when they differ only in case and whitespace."""
    return " ".join(text.lower().split())


def text_key(text: str) -> int:
    """A 63-bit hash of the normalised text: what exact duplicates share."""
    digest = hashlib.blake2b(normalize_text(text).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def record_order(source_rank: int, line: int | None) -> int:
    """The row's place in the global order (source by rank, then line) as one int64."""
    return (source_rank << _LINE_BITS) + ((line if line is not None else -1) + 1)


def row_orders(table: pa.Table, ranks: dict[str, int]) -> np.ndarray:
    """``record_order`` of every row of an Arrow table with source and source_line."""
    sources = table["source"].to_pylist()
    lines = table["source_line"].to_pylist()
    return np.array(
        [record_order(ranks[s or ""], line) for s, line in zip(sources, lines, strict=True)],
        dtype=np.int64,
    )


# ----------------------------------------------------------------------------------- exact
def mark_exact_duplicates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Among ok rows with the same normalised input, keep the first by (source, line) and
    filter the others (``duplicate: same input as row <id>``). Rows of one group must all
    be in `rows` (``global_steps`` partitions by ``text_key``)."""
    first: dict[str, dict[str, Any]] = {}
    live = [r for r in rows if r["status"] == OK and r["input"] is not None]
    live.sort(
        key=lambda r: (r["source"] or "", r["source_line"] if r["source_line"] is not None else -1)
    )
    for row in live:
        key = normalize_text(row["input"])
        kept = first.setdefault(key, row)
        if kept is not row:
            row["status"] = FILTERED
            row["reason"] = f"duplicate: same input as row {kept['id']}"
    return rows


# ------------------------------------------------------------------------------- minhash
def shingles(text: str, ngram: int, unit: str) -> list[bytes]:
    """The n-grams of the normalised text (characters or words), as bytes; a text shorter
    than one n-gram is its own single shingle."""
    norm = normalize_text(text)
    if unit == "word":
        words = _WORD.findall(norm)
        grams = [" ".join(words[i : i + ngram]) for i in range(max(1, len(words) - ngram + 1))]
    else:
        grams = [norm[i : i + ngram] for i in range(max(1, len(norm) - ngram + 1))]
    return [g.encode() for g in set(grams)]


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) datasketch picks for this threshold (equal weight on false
    positives and false negatives)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def minhashes(texts: Iterable[str], cfg: NearDedupSection) -> list[Any]:
    """datasketch MinHash of each text's shingles (fixed permutations: comparable across
    processes and runs)."""
    from datasketch import MinHash

    return MinHash.bulk([shingles(t, cfg.ngram, cfg.unit) for t in texts], num_perm=cfg.num_perm)


def minhash_signatures(texts: list[str], cfg: NearDedupSection) -> np.ndarray:
    """The MinHash values of each text, one row per text (uint32)."""
    if not texts:
        return np.zeros((0, cfg.num_perm), dtype=np.uint32)
    return np.stack([m.hashvalues for m in minhashes(texts, cfg)]).astype(np.uint32)


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of MinHash signatures (row by row)."""
    return (a == b).mean(axis=-1)


def minhash_band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) int64 keys: a hash of each band's values, salted with the band's index,
    so rows share a key exactly when they agree on a whole band (2^-63 aside)."""
    n = signatures.shape[0]
    keys = np.empty((n, bands), dtype=np.int64)
    sig = signatures.astype(np.uint64)
    with np.errstate(over="ignore"):  # the hash wraps around 2^64 on purpose
        for j in range(bands):
            part = sig[:, j * rows : (j + 1) * rows]
            h = np.full(n, np.uint64(j + 1) * _BAND_MULTIPLIERS[-1], dtype=np.uint64)
            h = h + (part * _BAND_MULTIPLIERS[:rows]).sum(axis=1, dtype=np.uint64)
            keys[:, j] = (h >> np.uint64(1)).astype(np.int64)
    return keys


# ------------------------------------------------------------------------------ semantic
def hyperplanes(dim: int, bands: int, bits: int, seed: int) -> np.ndarray:
    """(bands * bits, dim) random hyperplanes of the semantic LSH (fixed by the seed)."""
    return np.random.default_rng(seed).standard_normal((bands * bits, dim)).astype(np.float32)


def simhash_band_keys(vectors: np.ndarray, planes: np.ndarray, bands: int, bits: int) -> np.ndarray:
    """(n, bands) int64 keys: which side of each band's hyperplanes a vector lies on."""
    signs = (vectors @ planes.T > 0).astype(np.int64).reshape(len(vectors), bands, bits)
    weights = 1 << np.arange(bits, dtype=np.int64)
    return (signs * weights).sum(axis=2) + (np.arange(bands, dtype=np.int64) << 56)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of unit vectors (row by row)."""
    return (a * b).sum(axis=-1)


# ------------------------------------------------------------------------------ clusters
PAIRS_UP_TO = 16  # buckets up to this size link every pair of rows; larger ones a star


def bucket_edges(keys: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate links of rows sharing a band key: arrays (later row's order, earlier row's
    order). Every row links to the first row (lowest order) of its bucket; in buckets of up
    to ``PAIRS_UP_TO`` rows every pair links (so a pair is verified even when the first row
    is like neither). All rows of a key must be given together (``global_steps``
    partitions by key)."""
    if len(keys) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    idx = np.lexsort((orders, keys))
    k, o = keys[idx], orders[idx]
    starts = np.ones(len(k), dtype=bool)
    starts[1:] = k[1:] != k[:-1]
    first = np.maximum.accumulate(np.where(starts, np.arange(len(k)), 0))
    member = ~starts
    a, b = [o[member]], [o[first[member]]]
    bounds = np.append(np.flatnonzero(starts), len(k))
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        if 3 <= hi - lo <= PAIRS_UP_TO:  # the pairs not involving the first row
            earlier, later = np.triu_indices(hi - lo - 1, k=1)
            a.append(o[lo + 1 + later])
            b.append(o[lo + 1 + earlier])
    return np.concatenate(a), np.concatenate(b)


@dataclass
class Cluster:
    kept: int  # order of the row kept
    size: int


def clusters(a: np.ndarray, b: np.ndarray) -> dict[int, Cluster]:
    """Connected components of the links a[i] -- b[i] (union-find): {order of every row in
    a component of 2 or more: its component}; the kept row is the first of each."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = find(x), find(y)
        if rx != ry:
            # The smaller order becomes the root: the root is always the first row.
            parent[max(rx, ry)] = min(rx, ry)
    roots = {x: find(x) for x in parent}
    sizes = Counter(roots.values())
    return {x: Cluster(kept=r, size=sizes[r]) for x, r in roots.items()}


def duplicate_notes(
    a: np.ndarray,
    b: np.ndarray,
    sims: np.ndarray,
    ids: dict[int, str],
    kind: str,
    measure: str,
) -> pa.Table:
    """The rows to drop for links a[i] -- b[i] of similarity sims[i], as a table (order,
    reason, size): every row of a cluster but its first, with the reason naming its most
    similar linked row and the kept one. `ids`: {order: row id} of every linked row."""
    groups = clusters(a, b)
    best: dict[int, tuple[float, int]] = {}
    for x, y, s in zip(a.tolist(), b.tolist(), sims.tolist(), strict=True):
        for u, v in ((x, y), (y, x)):
            if u not in best or (s, -v) > (best[u][0], -best[u][1]):
                best[u] = (s, v)
    orders, reasons, sizes = [], [], []
    for x, c in sorted(groups.items()):
        if x == c.kept:
            continue
        s, nearest = best[x]
        orders.append(x)
        sizes.append(c.size)
        how = f"{measure} {s:.2f} with" if s == s else "shares an LSH band with"  # nan: unverified
        reasons.append(
            f"{kind}: {how} row {ids[nearest]}; row {ids[c.kept]} kept of a cluster of {c.size}"
        )
    return pa.table(
        {
            "order": pa.array(orders, pa.int64()),
            "reason": pa.array(reasons, pa.string()),
            "size": pa.array(sizes, pa.int64()),
        }
    )


# ---------------------------------------------------------------------------- test sets
class TestIndex:
    """The inputs of the test sets a training set must not overlap: exact (normalised) and,
    with a near threshold, MinHash LSH near-duplicates. Small (test sets are), so it is
    built once and shipped to every task."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        records: list[tuple[str, int, str]],
        near: NearDedupSection | None = None,
        threshold: float | None = None,
    ):
        """`records`: (test set name, record number, input text)."""
        self.exact: dict[str, tuple[str, int]] = {}
        for name, number, text in records:
            self.exact.setdefault(normalize_text(text), (name, number))
        self.near = near
        self.threshold = threshold
        self.lsh = None
        if threshold is not None and records:
            from datasketch import MinHashLSH

            assert near is not None
            self.lsh = MinHashLSH(threshold=threshold, num_perm=near.num_perm)
            self.hashes = minhashes([text for _, _, text in records], near)
            self.names = [(name, number) for name, number, _ in records]
            with self.lsh.insertion_session() as session:
                for i, m in enumerate(self.hashes):
                    session.insert(i, m, check_duplication=False)

    def __bool__(self) -> bool:
        return bool(self.exact)

    def lookup(self, texts: list[str]) -> list[str | None]:
        """For each text, what it overlaps (``input is in test set 'x'``, ``~0.91 similar
        to record 12 of test set 'x'``), or None."""
        out: list[str | None] = []
        near_todo = []
        for i, text in enumerate(texts):
            hit = self.exact.get(normalize_text(text))
            out.append(None if hit is None else f"input is in test set '{hit[0]}'")
            if hit is None and self.lsh is not None:
                near_todo.append(i)
        if near_todo:
            for i, m in zip(
                near_todo, minhashes([texts[i] for i in near_todo], self.near), strict=True
            ):
                scored = [(m.jaccard(self.hashes[j]), -j) for j in self.lsh.query(m)]
                scored = [x for x in scored if x[0] >= self.threshold]
                if scored:
                    sim, j = max(scored)
                    name, number = self.names[-j]
                    out[i] = f"~{sim:.2f} similar to record {number} of test set '{name}'"
        return out
