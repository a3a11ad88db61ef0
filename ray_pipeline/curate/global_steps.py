"""The curate steps that need rows of several blocks together, on Ray Data.

Nothing here gathers the dataset on the driver. Every global step is a shuffle that brings
the rows that must meet into one task (a *partition*), then plain functions of
``dedup``/``vote``/``balance`` run on the rows of one partition:

* ``by_partition``: whole rows, partitioned by a key's hash (the normalised input for exact
  dedup and vote merging, the source or user for caps) modulo ``parts``: every row with one
  key value lands in one partition, each partition is one ``map_groups`` call;
* ``cogroup``: two datasets that share a key (signatures and candidate links, rows and the
  notes that drop them), partitioned alike, met in one call per partition: a join without
  an actor per partition;
* the clusters of near and semantic duplicates are connected components of the candidate
  links: one task over the links (their number grows with the duplicates, not the rows).

Shuffles are Ray Data's sort shuffle (set by the stage): range partitions made by tasks, so
a small run pays no start-up for aggregator actors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_pipeline.config import CurateSection, NearDedupSection, SemanticDedupSection
from ray_pipeline.curate.dedup import (
    bucket_edges,
    cosine,
    duplicate_notes,
    hyperplanes,
    jaccard,
    lsh_bands,
    minhash_band_keys,
    minhash_signatures,
    row_orders,
    simhash_band_keys,
    text_key,
)
from ray_pipeline.data.schema import FILTERED, OK, ROW_SCHEMA, to_table

PART = "_part"
ROWS_PER_BATCH = 4096  # rows a row-by-row step holds as Python objects at once
ORDER = "_order"
SIDE = "_side"
SIGNATURES = pa.schema(
    [
        ("order", pa.int64()),
        ("id", pa.string()),
        ("sig", pa.binary()),
        ("keys", pa.list_(pa.int64())),
    ]
)
BANDS = pa.schema([("key", pa.int64()), ("order", pa.int64()), ("id", pa.string())])
LINKS = pa.schema(
    [("a", pa.int64()), ("a_id", pa.string()), ("b", pa.int64()), ("b_id", pa.string())]
)
LINKS_A = LINKS.append(pa.field("a_sig", pa.binary()))
SCORED = LINKS.append(pa.field("sim", pa.float64()))
NOTES = pa.schema([("order", pa.int64()), ("reason", pa.string()), ("size", pa.int64())])


def partitions(rows: int, cfg: CurateSection) -> int:
    """Partitions of a global step for `rows` rows (one task holds one)."""
    return max(1, math.ceil(rows / cfg.rows_per_partition))


def source_ranks(sources: list[str | None]) -> dict[str, int]:
    """{source: rank}: the order of the sources in the global row order (one entry per
    source file)."""
    return {s: i for i, s in enumerate(sorted({(s or "") for s in sources}))}


def _hash_str(value: str) -> int:
    return text_key(value) if value else 0


def _key_column(batch: pa.Table, by: str, ranks: dict[str, int]) -> np.ndarray:
    orders = row_orders(batch, ranks)
    if by == "text":
        texts, status = batch["input"].to_pylist(), batch["status"].to_pylist()
        keys = [
            text_key(t) if t is not None and s == OK else int(o)
            for t, s, o in zip(texts, status, orders, strict=True)
        ]
    else:  # source or user
        values = batch[by].to_pylist()
        keys = [
            _hash_str(v) if v is not None else int(o) for v, o in zip(values, orders, strict=True)
        ]
    return np.array(keys, dtype=np.int64)


def _with_partition(batch: pa.Table, by: str, parts: int, ranks: dict[str, int]) -> pa.Table:
    keys = _key_column(batch, by, ranks) if len(batch) else np.zeros(0, dtype=np.int64)
    return batch.append_column(PART, pa.array(keys % parts, pa.int64()))


def _rows_step(group: pa.Table, step: Callable, kwargs: dict[str, Any]) -> pa.Table:
    return to_table(step(group.drop_columns([PART]).to_pylist(), **kwargs))


def by_partition(
    ds: Any, by: str, step: Callable, kwargs: dict[str, Any], parts: int, ranks: dict[str, int]
) -> Any:
    """`step(rows, **kwargs) -> rows` over every partition of whole rows, where a partition
    holds every row with the same `by` key: the normalised input ('text'; rows that are not
    ok go by their own record), 'source' or 'user' (rows without one by their record).
    Partitioned by the key's hash modulo `parts`, in one shuffle of the rows."""
    return (
        ds.map_batches(
            _with_partition,
            fn_kwargs={"by": by, "parts": parts, "ranks": ranks},
            batch_format="pyarrow",
        )
        .groupby(PART)
        .map_groups(_rows_step, fn_kwargs={"step": step, "kwargs": kwargs}, batch_format="pyarrow")
    )


def _rows_map(batch: pa.Table, step: Callable, kwargs: dict[str, Any]) -> pa.Table:
    return to_table(step(batch.to_pylist(), **kwargs))


def each_row(ds: Any, step: Callable, **kwargs: Any) -> Any:
    """`step(rows, **kwargs) -> rows` over every batch: the row-by-row steps."""
    return ds.map_batches(
        _rows_map,
        fn_kwargs={"step": step, "kwargs": kwargs},
        batch_format="pyarrow",
        batch_size=ROWS_PER_BATCH,
    )


# ----------------------------------------------------------------------------- cogroup
def _widen(
    batch: pa.Table, side: int, key: str, parts: int, left: pa.Schema, right: pa.Schema
) -> pa.Table:
    n = len(batch)
    mine, other = (left, right) if side == 0 else (right, left)
    cols: dict[str, pa.Array] = {
        PART: pa.array(np.asarray(batch[key].to_numpy(zero_copy_only=False)) % parts, pa.int64()),
        SIDE: pa.array(np.full(n, side, dtype=np.int8)),
    }
    names = {0: "l.", 1: "r."}
    for schema, prefix, present in ((mine, names[side], True), (other, names[1 - side], False)):
        for f in schema:
            cols[prefix + f.name] = batch[f.name] if present else pa.nulls(n, f.type)
    order = [PART, SIDE] + [f"l.{f.name}" for f in left] + [f"r.{f.name}" for f in right]
    return pa.table({name: cols[name] for name in order})


def _split(group: pa.Table, side: int, schema: pa.Schema) -> pa.Table:
    prefix = "l." if side == 0 else "r."
    rows = group.filter(pc.equal(group[SIDE], side))
    return pa.Table.from_arrays([rows[prefix + f.name] for f in schema], schema=schema)


def _cogroup_step(
    group: pa.Table, fn: Callable, kwargs: dict[str, Any], left: pa.Schema, right: pa.Schema
) -> pa.Table:
    return fn(_split(group, 0, left), _split(group, 1, right), **kwargs)


def cogroup(
    left: Any,
    right: Any,
    keys: tuple[str, str],
    schemas: tuple[pa.Schema, pa.Schema],
    fn: Callable,
    kwargs: dict[str, Any],
    parts: int,
) -> Any:
    """`fn(left rows, right rows, **kwargs) -> table` for every partition of the int64 keys
    (`keys`: the left and right key columns): both sides' rows with equal keys meet in one
    call. One sort shuffle of both, partitioned by key modulo `parts`."""
    lschema, rschema = (pa.schema([f.with_nullable(True) for f in s]) for s in schemas)
    wide = {"parts": parts, "left": lschema, "right": rschema}
    tagged_left = left.map_batches(
        _widen, fn_kwargs={"side": 0, "key": keys[0], **wide}, batch_format="pyarrow"
    )
    tagged_right = right.map_batches(
        _widen, fn_kwargs={"side": 1, "key": keys[1], **wide}, batch_format="pyarrow"
    )
    return (
        tagged_left.union(tagged_right)
        .groupby(PART)
        .map_groups(
            _cogroup_step,
            fn_kwargs={"fn": fn, "kwargs": kwargs, "left": lschema, "right": rschema},
            batch_format="pyarrow",
        )
    )


# --------------------------------------------------------------------- near / semantic
def _minhash_rows(
    batch: pa.Table, cfg: NearDedupSection, ranks: dict[str, int], bands: int, rows: int
) -> pa.Table:
    ok = pc.and_(pc.equal(batch["status"], OK), pc.invert(pc.is_null(batch["input"])))
    live = batch.filter(ok)
    sigs = minhash_signatures(live["input"].to_pylist(), cfg)
    keys = minhash_band_keys(sigs, bands, rows)
    return pa.table(
        {
            "order": pa.array(row_orders(live, ranks), pa.int64()),
            "id": live["id"],
            "sig": pa.array([s.tobytes() for s in sigs], pa.binary()),
            "keys": pa.array(keys.tolist(), pa.list_(pa.int64())),
        },
        schema=SIGNATURES,
    )


class Embedder:
    """Sentence embeddings of the ok rows' inputs (mean-pooled last hidden states, unit
    length) and their random-hyperplane band keys: a Ray Data actor (the model loads once)."""

    def __init__(self, cfg: SemanticDedupSection, ranks: dict[str, int], seed: int):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.cfg = cfg
        self.ranks = ranks
        self.seed = seed
        self.device = "cuda" if cfg.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.model = AutoModel.from_pretrained(cfg.model).to(self.device).eval()
        self.planes: np.ndarray | None = None

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(texts), self.cfg.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.cfg.batch_size],
                padding=True,
                truncation=True,
                max_length=self.cfg.max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = pc.and_(
            pc.equal(batch["status"], OK),
            pc.invert(pc.is_null(batch["input"])),
        )
        live = batch.filter(ok)
        vectors = self.embed(live["input"].to_pylist())
        if self.planes is None and len(live):
            self.planes = hyperplanes(vectors.shape[1], self.cfg.bands, self.cfg.bits, self.seed)
        keys = (
            simhash_band_keys(vectors, self.planes, self.cfg.bands, self.cfg.bits)
            if len(live)
            else np.zeros((0, self.cfg.bands), dtype=np.int64)
        )
        return pa.table(
            {
                "order": pa.array(row_orders(live, self.ranks), pa.int64()),
                "id": live["id"],
                "sig": pa.array([v.astype(np.float32).tobytes() for v in vectors], pa.binary()),
                "keys": pa.array(keys.tolist(), pa.list_(pa.int64())),
            },
            schema=SIGNATURES,
        )


def _explode(batch: pa.Table, parts: int) -> pa.Table:
    """One row per (band key, row), partitioned by the key."""
    lengths = pc.list_value_length(batch["keys"]).to_numpy(zero_copy_only=False)
    keys = pc.list_flatten(batch["keys"])
    return pa.table(
        {
            "key": keys,
            "order": pa.array(np.repeat(batch["order"].to_numpy(), lengths), pa.int64()),
            "id": batch["id"].take(pa.array(np.repeat(np.arange(len(batch)), lengths))),
            PART: pa.array(keys.to_numpy(zero_copy_only=False) % parts, pa.int64()),
        },
        schema=BANDS.append(pa.field(PART, pa.int64())),
    )


def _bucket_links(group: pa.Table) -> pa.Table:
    """The rows of some band keys (all rows of each): each links to its bucket's first."""
    orders = group["order"].to_numpy()
    ids = dict(zip(orders.tolist(), group["id"].to_pylist(), strict=True))
    a, b = bucket_edges(group["key"].to_numpy(), orders)
    if len(a):  # a pair sharing several bands is one link
        pairs = np.unique(np.stack([a, b], axis=1), axis=0)
        a, b = pairs[:, 0], pairs[:, 1]
    return pa.table(
        {
            "a": pa.array(a, pa.int64()),
            "a_id": pa.array([ids[x] for x in a.tolist()], pa.string()),
            "b": pa.array(b, pa.int64()),
            "b_id": pa.array([ids[x] for x in b.tolist()], pa.string()),
        },
        schema=LINKS,
    )


def _attach_a(links: pa.Table, sigs: pa.Table) -> pa.Table:
    by_order = dict(zip(sigs["order"].to_pylist(), sigs["sig"].to_pylist(), strict=True))
    return links.append_column(
        "a_sig", pa.array([by_order[x] for x in links["a"].to_pylist()], pa.binary())
    )


def _score_b(
    links: pa.Table, sigs: pa.Table, dtype: str, measure: str, threshold: float
) -> pa.Table:
    by_order = dict(zip(sigs["order"].to_pylist(), sigs["sig"].to_pylist(), strict=True))
    if len(links) == 0:
        return pa.Table.from_pylist([], schema=SCORED)
    a = np.stack([np.frombuffer(s, dtype=dtype) for s in links["a_sig"].to_pylist()])
    b = np.stack([np.frombuffer(by_order[x], dtype=dtype) for x in links["b"].to_pylist()])
    sims = jaccard(a, b) if measure == "jaccard" else cosine(a, b)
    table = links.drop_columns(["a_sig"]).append_column("sim", pa.array(sims, pa.float64()))
    return table.filter(pa.array(sims >= threshold))


def _cluster_notes(links: pa.Table, kind: str, measure: str) -> pa.Table:
    """All the links of the dataset (one group): the rows to drop."""
    ids = dict(zip(links["a"].to_pylist(), links["a_id"].to_pylist(), strict=True))
    ids.update(zip(links["b"].to_pylist(), links["b_id"].to_pylist(), strict=True))
    sims = links["sim"].to_numpy(zero_copy_only=False) if "sim" in links.column_names else None
    a, b = links["a"].to_numpy(), links["b"].to_numpy()
    if sims is None:
        sims = np.full(len(a), np.nan)
    return duplicate_notes(a, b, sims, ids, kind, measure)


def _add_order(batch: pa.Table, ranks: dict[str, int]) -> pa.Table:
    return batch.append_column(ORDER, pa.array(row_orders(batch, ranks), pa.int64()))


def _apply_notes(rows: pa.Table, notes: pa.Table) -> pa.Table:
    reasons = dict(zip(notes["order"].to_pylist(), notes["reason"].to_pylist(), strict=True))
    out = rows.drop_columns([ORDER]).to_pylist()
    for row, order in zip(out, rows[ORDER].to_pylist(), strict=True):
        reason = reasons.get(order)
        if reason is not None and row["status"] == OK:
            row["status"], row["reason"] = FILTERED, reason
    return to_table(out)


def _drop_order(batch: pa.Table) -> pa.Table:
    return batch.drop_columns([ORDER])


def in_record_order(ds: Any, ranks: dict[str, int]) -> Any:
    """The rows sorted by their record (source, line): the outputs do not depend on how the
    global steps partitioned the rows (one more sort shuffle)."""
    return (
        ds.map_batches(_add_order, fn_kwargs={"ranks": ranks}, batch_format="pyarrow")
        .sort(ORDER)
        .map_batches(_drop_order, batch_format="pyarrow")
    )


def apply_notes(ds: Any, notes: Any, ranks: dict[str, int], parts: int) -> Any:
    """The rows, those named in `notes` (order, reason) filtered with their reason: a join
    of rows and notes on the record order, as one ``cogroup``."""
    rows = ds.map_batches(_add_order, fn_kwargs={"ranks": ranks}, batch_format="pyarrow")
    row_schema = ROW_SCHEMA.append(pa.field(ORDER, pa.int64()))
    return cogroup(rows, notes, (ORDER, "order"), (row_schema, NOTES), _apply_notes, {}, parts)


def similar_duplicates(
    ds: Any,
    signatures: Any,
    *,
    kind: str,
    measure: str,
    dtype: str,
    threshold: float,
    verify: bool,
    ranks: dict[str, int],
    parts: int,
) -> tuple[Any, dict[int, int]]:
    """Drop the near (or semantic) duplicates of `ds` given the rows' signatures (order, id,
    sig, band keys): buckets of equal band keys (a shuffle of the band keys partitioned by
    key), links verified against the signatures (two cogroups partitioned by record
    order), clusters in one task over the links, and the notes joined back to the rows.
    Returns (rows, {cluster size: clusters})."""
    signatures = signatures.materialize()
    links = (
        signatures.map_batches(_explode, fn_kwargs={"parts": parts}, batch_format="pyarrow")
        .groupby(PART)
        .map_groups(_bucket_links, batch_format="pyarrow")
    )
    if verify:
        with_a = cogroup(
            links, signatures, ("a", "order"), (LINKS, SIGNATURES), _attach_a, {}, parts
        )
        links = cogroup(
            with_a,
            signatures,
            ("b", "order"),
            (LINKS_A, SIGNATURES),
            _score_b,
            {"dtype": dtype, "measure": measure, "threshold": threshold},
            parts,
        )
    notes = (
        links.groupby(None)  # one group: the connected components need every link
        .map_groups(
            _cluster_notes, fn_kwargs={"kind": kind, "measure": measure}, batch_format="pyarrow"
        )
        .materialize()
    )
    sizes: dict[int, int] = {}
    for r in notes.groupby("size").count().take_all():
        # A cluster of k rows has k - 1 notes.
        sizes[int(r["size"])] = int(r["count()"]) // (int(r["size"]) - 1)
    if not sizes:
        return ds, {}
    return apply_notes(ds, notes, ranks, parts), dict(sorted(sizes.items()))


def near_duplicates(ds: Any, cfg: NearDedupSection, ranks: dict[str, int], parts: int):
    """MinHash LSH near-duplicates (``similar_duplicates``); signatures by map_batches."""
    bands, rows = lsh_bands(cfg.threshold, cfg.num_perm)
    signatures = ds.map_batches(
        _minhash_rows,
        fn_kwargs={"cfg": cfg, "ranks": ranks, "bands": bands, "rows": rows},
        batch_format="pyarrow",
        batch_size=ROWS_PER_BATCH,  # the shingles of a batch are held as Python objects
    )
    return similar_duplicates(
        ds,
        signatures,
        kind="near_duplicate",
        measure="jaccard",
        dtype="uint32",
        threshold=cfg.threshold,
        verify=cfg.verify,
        ranks=ranks,
        parts=parts,
    )


def semantic_duplicates(
    ds: Any, cfg: SemanticDedupSection, ranks: dict[str, int], parts: int, seed: int
):
    """Embedding near-duplicates (``similar_duplicates``); embeddings by an actor pool."""
    import ray

    signatures = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"cfg": cfg, "ranks": ranks, "seed": seed},
        batch_format="pyarrow",
        batch_size=cfg.batch_size * 4,
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_gpus=cfg.num_gpus_per_actor,
    )
    return similar_duplicates(
        ds,
        signatures,
        kind="semantic_duplicate",
        measure="cosine",
        dtype="float32",
        threshold=cfg.threshold,
        verify=True,
        ranks=ranks,
        parts=parts,
    )
