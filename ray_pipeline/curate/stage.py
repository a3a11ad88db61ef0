"""Curate stage (Ray Data): the generated rows -> the training set, its manifest and data card.

The steps, in order (each one a config section under ``curate:``):

1. row filters: unparsable answers, gold labels outside the task's labels, rules (lengths in
   characters and tokens, regex deny/allow, refusals, empty answers, prompt echoes, the
   answer's JSON Schema), overlap with the test sets (exact, or near-duplicate);
2. vote merging (``vote.group_by: input``): rows of one input become one vote;
3. dedup: exact, near (MinHash LSH), semantic (embeddings);
4. test sets built from gold-labelled rows, frozen and held out;
5. vote: the majority label and its agreement;
6. gold checks: teacher accuracy, and drop or relabel where the teacher disagrees; then rows
   of low vote agreement (and no gold label) go to review;
7. caps per source or user; the LLM judge; resampling to target label shares;
8. the nested dataset-size subsets, recorded.

Every row ends in exactly one of runs/<id>/dataset/train/ (Parquet, the ok rows),
dataset/review/ (JSONL, low agreement) or dataset/rejected/ (Parquet, every other row with its
reason). Beside them: dataset/manifest.json (every setting, counts per reason, accuracy,
hashes), dataset/card.html with its PNG plots, dataset/subsets/ (each kept row's smallest
subset), dataset/test_sets/ (built test sets and frozen.json). ``global_steps`` says how each
global step partitions; nothing gathers the rows on the driver.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ray_pipeline.config import DistillConfig
from ray_pipeline.curate import card
from ray_pipeline.curate.balance import balance_draw, cap_rows, quotas, resample
from ray_pipeline.curate.dedup import TestIndex, mark_exact_duplicates, row_orders
from ray_pipeline.curate.filters import (
    GoldFilter,
    LabelFilter,
    RuleFilter,
    TestOverlapFilter,
    load_tokenizer,
)
from ray_pipeline.curate.global_steps import (
    ROWS_PER_BATCH,
    by_partition,
    each_row,
    in_record_order,
    near_duplicates,
    partitions,
    semantic_duplicates,
    source_ranks,
)
from ray_pipeline.curate.gold import GoldCheck
from ray_pipeline.curate.holdout import (
    candidate_bounds,
    choose,
    test_records,
    test_unit,
    write_test_sets,
)
from ray_pipeline.curate.judge import cutoff, from_replies, keep_judged, to_requests
from ray_pipeline.curate.stats import LENGTH_EDGES, NGRAM_SAMPLE_ROWS, Stats, StatsConfig
from ray_pipeline.curate.vote import Review, Vote, merge_votes
from ray_pipeline.data.manifest import source_entry, write_manifest
from ray_pipeline.data.schema import FAILED, FILTERED, OK, answer_text, to_table
from ray_pipeline.data.subsets import smallest_subset
from ray_pipeline.run_state import Run

log = logging.getLogger("distill.curate")

REVIEW = "low_agreement"
HELD_OUT = "held_out"
ANY_ROW = "*"  # the one "label" of a generative task's test-set draw


# ------------------------------------------------------------------------ row steps
def row_filters(
    rows: list[dict[str, Any]], cfg: DistillConfig, index: TestIndex, tokenizer: str | None
) -> list[dict[str, Any]]:
    """The row-by-row filters of step 1, in order; the first reason a row meets stays."""
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    rules = RuleFilter(cfg.curate.rules, tok, answer_schema=cfg.task.output_schema)
    filters = [LabelFilter(cfg.task), GoldFilter(cfg.task), rules]
    if index:
        filters.append(TestOverlapFilter(index))
    for f in filters:
        rows = f(rows)
    return rows


def hold_out(
    rows: list[dict[str, Any]], chosen: dict[int, str], ranks: dict[str, int]
) -> list[dict[str, Any]]:
    """Rows chosen for a built test set leave training (``held_out``, split 'test')."""
    if not rows:
        return rows
    orders = row_orders(to_table(rows), ranks).tolist()
    for row, order in zip(rows, orders, strict=True):
        name = chosen.get(order)
        if name is not None:
            row.update(
                status=FILTERED, reason=f"{HELD_OUT}: in test set '{name}' built here", split="test"
            )
    return rows


# -------------------------------------------------------------------------- tallies
def _tally_batch(batch: pa.Table, fn: Callable, kwargs: dict[str, Any]) -> pa.Table:
    counts = fn(batch, **kwargs)
    return pa.table({"key": [pickle.dumps(k) for k in counts], "n": list(counts.values())})


def tally(ds: Any, fn: Callable, **kwargs: Any) -> Counter:
    """Sum of `fn(batch) -> Counter` over the dataset: one small table per block reaches the
    driver (its distinct keys), never the rows."""
    out: Counter = Counter()
    for r in ds.map_batches(
        _tally_batch, fn_kwargs={"fn": fn, "kwargs": kwargs}, batch_format="pyarrow"
    ).take_all():
        out[pickle.loads(r["key"])] += r["n"]
    return out


def _ok(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch["status"], OK))


def sources_and_labels(batch: pa.Table) -> Counter:
    """("source", s) per row, ("label", l) per ok row."""
    out = Counter(("source", s) for s in batch["source"].to_pylist())
    out.update(("label", lab) for lab in _ok(batch)["label"].to_pylist())
    return out


def ok_labels(batch: pa.Table) -> Counter:
    return Counter(_ok(batch)["label"].to_pylist())


def ok_gold(batch: pa.Table, labels: list[str]) -> Counter:
    return Counter(g for g in _ok(batch)["gold"].to_pylist() if g in labels)


def judge_scores(batch: pa.Table) -> Counter:
    return Counter(json.loads(s)["judge"]["score"] for s in _ok(batch)["scores"].to_pylist())


def _stats_batch(batch: pa.Table, cfg: StatsConfig) -> pa.Table:
    return pa.table({"stats": [pickle.dumps(Stats(cfg).add(batch.to_pylist()))]})


def gather_stats(ds: Any, cfg: StatsConfig) -> Stats:
    """One ``Stats`` per block, made where the block is, merged here."""
    total = Stats(cfg)
    for r in ds.map_batches(
        _stats_batch, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=16384
    ).take_all():
        total.merge(pickle.loads(r["stats"]))
    return total


# ---------------------------------------------------------------------- global steps
def _test_candidates(
    batch: pa.Table, spec: Any, seed: int, bounds: dict[str, float], ranks: dict[str, int]
) -> pa.Table:
    rows = _ok(batch)
    anything = ANY_ROW in bounds  # a generative task: every ok row is a candidate
    if not anything:
        rows = rows.filter(pc.is_in(rows["gold"], pa.array(list(bounds))))
    out = []
    for row, order in zip(rows.to_pylist(), row_orders(rows, ranks).tolist(), strict=True):
        u = test_unit(spec, seed, row["id"], order)
        gold = ANY_ROW if anything else row["gold"]
        if u < bounds[gold]:
            out.append({"order": order, "gold": gold, "u": u})
    schema = pa.schema([("order", pa.int64()), ("gold", pa.string()), ("u", pa.float64())])
    return pa.Table.from_pylist(out, schema=schema)


def ok_rows(batch: pa.Table) -> Counter:
    return Counter({ANY_ROW: _ok(batch).num_rows})


def build_test_sets(ds: Any, cfg: DistillConfig, ranks: dict[str, int]) -> Any:
    """Choose the rows of each configured test set among the ok gold-labelled rows (the
    smallest hash draws; candidates of about twice the size reach the driver, never the
    rows) and hold them out. A generative task draws from every ok row: its reference is
    the row's gold answer where it has one, else the teacher's answer."""
    generative = cfg.task.generative
    labels = [ANY_ROW] if generative else cfg.task.labels
    chosen: dict[int, str] = {}
    for spec in cfg.curate.test_sets.build:
        counts = tally(ds, ok_rows) if generative else tally(ds, ok_gold, labels=labels)
        widen = 1.0
        while True:
            bounds = candidate_bounds(spec, labels, counts, widen)
            candidates = [
                c
                for c in ds.map_batches(
                    _test_candidates,
                    fn_kwargs={
                        "spec": spec,
                        "seed": cfg.run.seed,
                        "bounds": bounds,
                        "ranks": ranks,
                    },
                    batch_format="pyarrow",
                ).take_all()
                if c["order"] not in chosen
            ]
            picked = choose(candidates, spec, labels, counts)
            if picked is not None:
                break
            widen *= 4  # an unlucky draw: ask for more candidates
        for c in picked:
            chosen[c["order"]] = spec.name
        ds = each_row(ds, hold_out, chosen={c["order"]: spec.name for c in picked}, ranks=ranks)
        ds = ds.materialize()
        log.info("curate: test set '%s': %d rows held out", spec.name, len(picked))
    return ds


def _draws(batch: pa.Table, label: str, seed: int) -> pa.Table:
    rows = _ok(batch)
    rows = rows.filter(pc.equal(rows["label"], label)).to_pylist()
    return pa.table({"u": pa.array([balance_draw(r, seed) for r in rows], pa.float64())})


def balance_cut(ds: Any, label: str, keep: int, rows: int, seed: int) -> float:
    """The largest draw `label` keeps so that exactly `keep` of its `rows` ok rows stay: a
    distributed sort of the label's draws, limited to `keep`; one number reaches the driver."""
    if keep >= rows:
        return 1.0
    if keep == 0:
        return -1.0
    draws = ds.map_batches(_draws, fn_kwargs={"label": label, "seed": seed}, batch_format="pyarrow")
    return draws.sort("u").limit(keep).max("u")


def run_judge(ds: Any, run: Run, endpoint: Any) -> tuple[Any, dict[str, Any]]:
    """Score the ok rows through the teacher's actor pool and keep the best."""
    from ray_pipeline.teacher.session import TeacherSession

    j = run.cfg.curate.judge
    if endpoint is None:
        raise RuntimeError("curate.judge is enabled: the curate stage needs the teacher endpoint")
    session = TeacherSession(run, endpoint)
    before = session.snapshot()
    ds = each_row(ds, to_requests, rubric=j.rubric, target=run.cfg.train.target)
    with session.progress():
        ds = session.pool(
            ds,
            params={"temperature": 0.0, "max_tokens": j.max_tokens, "n": 1},
            voters=False,
            model=j.model,
        )
        ds = each_row(ds, from_replies).materialize()
    counts = tally(ds, judge_scores)
    score_cut, tie_share = cutoff(counts, j)
    ds = each_row(
        ds, keep_judged, score_cut=score_cut, tie_share=tie_share, cfg=j, seed=run.cfg.run.seed
    ).materialize()
    after = session.snapshot()
    info = {
        "model": j.model or run.cfg.teacher.model,
        "judged": sum(counts.values()),
        "scores": {str(k): v for k, v in sorted(counts.items())},
        "kept_from_score": score_cut,
        "tie_share_kept": round(tie_share, 4),
        "calls": after["calls"] - before["calls"],
        "cache_hits": after["cache_hits"] - before["cache_hits"],
        "cost_usd": round(after["cost_usd"] - before["cost_usd"], 6),
    }
    if after["budget_stop"]:
        info["budget_stop"] = after["budget_stop"]
    return ds, info


# --------------------------------------------------------------------------- outputs
def _select(batch: pa.Table, which: str) -> pa.Table:
    status, reason = batch["status"], batch["reason"]
    review = pc.fill_null(pc.starts_with(reason, REVIEW), False)
    if which == "train":
        keep = pc.equal(status, OK)
    elif which == "review":
        keep = pc.and_(pc.not_equal(status, OK), review)
    elif which == "held_out":
        keep = pc.fill_null(pc.starts_with(reason, HELD_OUT), False)
    else:
        keep = pc.and_(pc.not_equal(status, OK), pc.invert(review))
    return batch.filter(keep)


def _subset_rows(batch: pa.Table, fractions: list[float], seed: int) -> pa.Table:
    ok = _ok(batch)
    return pa.table(
        {
            "id": ok["id"],
            "label": ok["label"],
            "subset": pa.array(
                [smallest_subset(i, fractions, seed) for i in ok["id"].to_pylist()], pa.float64()
            ),
        }
    )


def _write(ds: Any, run: Run) -> dict[str, str]:
    paths = run.paths
    dirs = {
        "train": paths.dataset_train,
        "rejected": paths.dataset_rejected,
        "review": paths.dataset / "review",
        "subsets": paths.dataset / "subsets",
    }
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
    for which in ("train", "rejected"):
        part = ds.map_batches(_select, fn_kwargs={"which": which}, batch_format="pyarrow")
        part.write_parquet(str(dirs[which]), ray_remote_args=run.write_args())
    ds.map_batches(_select, fn_kwargs={"which": "review"}, batch_format="pyarrow").write_json(
        str(dirs["review"]), ray_remote_args=run.write_args()
    )
    c = run.cfg.curate
    ds.map_batches(
        _subset_rows,
        fn_kwargs={"fractions": c.subsets.fractions, "seed": run.cfg.run.seed},
        batch_format="pyarrow",
    ).write_parquet(str(dirs["subsets"]), ray_remote_args=run.write_args())
    for d in dirs.values():
        d.mkdir(exist_ok=True)  # an empty selection writes no files
    return {k: str(v) for k, v in dirs.items()}


def _refuse_overlap(stats: Stats) -> None:
    n = stats.reasons.get("test_overlap", 0)
    if not n:
        return
    examples = "; ".join(
        f"{r['source']}:{r['source_line']} {r['reason'].split(': ', 1)[1]}"
        for r in stats.sample_rows().get("test_overlap", [])[:3]
    )
    raise ValueError(
        f"curate.test_sets.on_overlap is 'refuse' and {n} training row(s) overlap a test set "
        f"(e.g. {examples}). Remove them from the logs, or set curate.test_sets.on_overlap: drop."
    )


# ----------------------------------------------------------------------------- stage
def run_curate(run: Run, endpoint: Any = None) -> dict[str, Any]:
    import ray

    # The global steps shuffle with Ray Data's sort shuffle: range partitions made by tasks.
    # The default hash shuffle starts aggregator actors for every shuffle, seconds each on a
    # small cluster, and the stage shuffles several times.
    ctx = ray.data.DataContext.get_current()
    previous = ctx.shuffle_strategy
    ctx.shuffle_strategy = "sort_shuffle_pull_based"
    try:
        return _curate(run, endpoint)
    finally:
        ctx.shuffle_strategy = previous


def _curate(run: Run, endpoint: Any) -> dict[str, Any]:
    import ray

    started = time.perf_counter()
    cfg, c = run.cfg, run.cfg.curate
    run.require("generate")
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def done(step: str, ds: Any) -> Any:
        ds = ds.materialize()
        now = time.perf_counter()
        timings[step] = round(now - clock[0], 2)
        clock[0] = now
        log.info("curate: %s done in %.1fs", step, timings[step])
        return ds

    ds = ray.data.read_parquet(run.shared(run.paths.generated_rows))
    rows_in = ds.count()
    parts = partitions(rows_in, c)
    # One pass for what the steps need to know first: the sources and the labels as they come.
    first = tally(ds, sources_and_labels)
    ranks = source_ranks([k[1] for k in first if k[0] == "source"])
    labels_before = Counter({k[1]: n for k, n in first.items() if k[0] == "label"})
    stats_cfg = StatsConfig(
        labels=cfg.task.labels,
        fractions=c.subsets.fractions,
        seed=cfg.run.seed,
        samples=c.samples_per_reason,
        ngram_rate=min(1.0, NGRAM_SAMPLE_ROWS / max(rows_in, 1)),
    )
    records, checked = test_records(cfg)
    index = TestIndex(records, c.dedup.near, c.test_sets.near_threshold)
    tokenizer = cfg.student_tokenizer() if c.rules.uses_tokens else None
    ds = ds.map_batches(
        _row_step, fn_kwargs={"cfg": cfg, "index": index, "tokenizer": tokenizer},
        batch_format="pyarrow", batch_size=ROWS_PER_BATCH,
    )  # fmt: skip
    ds = done("filters", ds)
    steps: dict[str, Any] = {}
    if c.vote.enabled and c.vote.group_by == "input":
        ds = done("vote_merge", by_partition(ds, "text", merge_votes, {}, parts, ranks))
    if c.dedup.exact:
        ds = done("exact_dedup", by_partition(ds, "text", mark_exact_duplicates, {}, parts, ranks))
    if c.dedup.near.enabled:
        ds, sizes = near_duplicates(ds, c.dedup.near, ranks, parts)
        ds = done("near_dedup", ds)
        steps["near_dedup"] = {"clusters_by_size": sizes, "clusters": sum(sizes.values())}
    if c.dedup.semantic.enabled:
        ds, sizes = semantic_duplicates(ds, c.dedup.semantic, ranks, parts, cfg.run.seed)
        ds = done("semantic_dedup", ds)
        steps["semantic_dedup"] = {"clusters_by_size": sizes, "clusters": sum(sizes.values())}
    if c.test_sets.build:
        ds = done("test_sets", build_test_sets(ds, cfg, ranks))
    if c.vote.enabled:
        ds = done("vote", each_row(ds, Vote(cfg.task)))
    if cfg.task.generative:
        log.info("curate: no gold check: a generative task's gold is a reference answer")
    else:
        ds = done("gold", each_row(ds, GoldCheck(c.gold, cfg.task)))
    if c.vote.enabled and c.vote.min_agreement > 0:
        ds = done("review", each_row(ds, Review(c.vote, cfg.task)))
    if c.balance.cap_per is not None:
        kw = {"by": c.balance.cap_per, "cap": c.balance.cap, "seed": cfg.run.seed}
        ds = done("caps", by_partition(ds, c.balance.cap_per, cap_rows, kw, parts, ranks))
    if c.judge.enabled:
        ds, steps["judge"] = run_judge(ds, run, endpoint)
        ds = done("judge", ds)
    if c.balance.target is not None:
        counts = tally(ds, ok_labels)
        keep = quotas(dict(counts), c.balance.target)
        cuts = {lab: balance_cut(ds, lab, k, counts[lab], cfg.run.seed) for lab, k in keep.items()}
        ds = each_row(ds, resample, cuts=cuts, target=c.balance.target, seed=cfg.run.seed)
        ds = done("balance", ds)
        steps["balance"] = {"before": _named(counts), "kept": _named(Counter(keep))}

    ds = done("record_order", in_record_order(ds, ranks))
    after = gather_stats(ds, stats_cfg)
    if c.test_sets.on_overlap == "refuse":
        _refuse_overlap(after)
    run.stage_dir("dataset")
    outputs = _write(ds, run)
    test_dir = run.paths.dataset / "test_sets"
    shutil.rmtree(test_dir, ignore_errors=True)
    frozen = None
    if c.test_sets.build:
        held = ds.map_batches(_select, fn_kwargs={"which": "held_out"}, batch_format="pyarrow")
        sets: dict[str, list[dict[str, Any]]] = {b.name: [] for b in c.test_sets.build}
        for r in held.take_all():  # the test sets: small by construction
            if cfg.task.generative and r["gold"] is None:
                r["gold"] = answer_text(r["output"])  # the teacher's answer is the reference
            sets[r["reason"].split("'")[1]].append(r)
        frozen = write_test_sets(sets, {b.name: b.kind for b in c.test_sets.build}, test_dir)
        outputs["test_sets"] = str(test_dir)
    timings["write"] = round(time.perf_counter() - clock[0], 2)

    manifest = _manifest(run, rows_in, labels_before, after, steps, checked, frozen, outputs)
    manifest_path = write_manifest(run.paths.dataset_manifest, manifest)
    card_path = card.write_card(run.paths.dataset, manifest, after.sample_rows())
    seconds = time.perf_counter() - started
    section = {
        "rows_in": rows_in,
        "kept": after.kept(),
        "filtered": after.status.get(FILTERED, 0),
        "failed": after.status.get(FAILED, 0),
        "review": after.reasons.get(REVIEW, 0),
        "reasons": dict(sorted(after.reasons.items())),
        # A generative task's rows have no labels (the card counts them under 'none').
        "labels": {} if cfg.task.generative else dict(sorted(after.labels.items())),
        "labels_before": {} if cfg.task.generative else manifest["labels_before"],
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows_in / seconds, 1) if seconds > 0 else None,
        "step_seconds": timings,
        "outputs": {**outputs, "manifest": str(manifest_path), "card": str(card_path)},
    }
    if manifest["gold"] is not None:
        section["gold"] = {
            k: manifest["gold"][k] for k in ("rows", "accuracy", "teachers", "mixed_gold_rows")
        }
    if "judge" in steps:
        section["judge"] = steps["judge"]
        if steps["judge"].get("budget_stop"):
            section["budget_stop"] = steps["judge"]["budget_stop"]
    log.info(
        "curate: kept %s of %s rows in %.1fs; dropped %s",
        section["kept"],
        rows_in,
        seconds,
        section["reasons"],
    )
    return section


def _row_step(
    batch: pa.Table, cfg: DistillConfig, index: TestIndex, tokenizer: str | None
) -> pa.Table:
    return to_table(row_filters(batch.to_pylist(), cfg, index, tokenizer))


def _manifest(
    run: Run,
    rows_in: int,
    labels_before: Counter,
    after: Stats,
    steps: dict[str, Any],
    checked: list[dict[str, Any]],
    frozen: dict[str, Any] | None,
    outputs: dict[str, str],
) -> dict[str, Any]:
    cfg = run.cfg
    sources = [source_entry(s.path, kind="log", **_source_settings(s)) for s in cfg.data.logs]
    if cfg.data.seeds is not None:
        sources.append(source_entry(cfg.data.seeds.path, kind="seeds", n_new=cfg.data.seeds.n_new))
    return {
        "run_id": run.run_id,
        "dataset": outputs["train"],
        "rejected": outputs["rejected"],
        "review": outputs["review"],
        "rows": after.kept(),
        "task": {
            "name": cfg.task.name,
            "kind": cfg.task.kind,
            "label_key": cfg.task.label_key,
            "labels": cfg.task.labels,
            "output_schema": cfg.task.output_schema,
        },
        "sources": sources,
        "teacher": {
            "model": cfg.teacher.model,
            "base_url": cfg.teacher.base_url or "simulator",
            "answered_by": _named(after.teachers),
        },
        "prompt_hash": sorted(after.prompt_hashes),
        "settings": cfg.curate.model_dump(mode="json"),
        "counts": {"in": rows_in, **{s: after.status.get(s, 0) for s in (OK, FILTERED, FAILED)}},
        "to_review": after.reasons.get(REVIEW, 0),
        "reasons": dict(sorted(after.reasons.items())),
        "labels": dict(sorted(after.labels.items())),
        "labels_before": _named(labels_before, skip_none=True),
        "rows_per_source": _named(after.sources),
        "gold": after.gold_summary(),
        "vote": (
            {
                "rows": after.vote["rows"],
                "relabeled": after.vote["relabeled"],
                "agreement": {f"{k:.2f}": v for k, v in sorted(after.agreement.items())},
            }
            if after.vote
            else None
        ),
        "steps": steps,
        "lengths": {
            "edges": LENGTH_EDGES,
            "kept": {str(k): v for k, v in sorted(after.lengths_kept.items())},
            "dropped": {str(k): v for k, v in sorted(after.lengths_dropped.items())},
        },
        "diversity": after.distinct_ngrams(),
        "subsets": {"seed": cfg.run.seed, "fractions": after.subset_table()},
        "test_sets": {"checked": checked, "built": frozen},
        "content_sha256": after.content_sha256(),
        "outputs": outputs,
    }


def _named(counts: Counter, skip_none: bool = False) -> dict[str, int]:
    """Counts keyed by name, sorted (a missing name is 'none', or left out)."""
    return {
        str(k) if k is not None else "none": v
        for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))
        if k is not None or not skip_none
    }


def _source_settings(src: Any) -> dict[str, Any]:
    fields = ("skip", "limit", "label_from", "response_field", "gold_field")
    return {k: getattr(src, k) for k in fields if getattr(src, k) not in (None, 0, "teacher")}
