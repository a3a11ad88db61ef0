"""The curate stage at scale: a million log rows with planted flaws, on an embedded local Ray.

Ray tasks write ``--rows`` generated rows (the generate stage's output: recorded answers,
parsed, in four source files) with flaws planted at known rates, each row tagged with what was
planted in it (in its ``user`` field): exact duplicates (another row's text up to case and
spacing), near-duplicates (another row's text with one word changed), and rule violations
(too short, too long, an excluded pattern, a refusal, a label the task does not have). The
curate stage then runs with rules, exact and near dedup on; nothing else runs in this
process, so its peak memory is the driver's. What was found is counted by Ray tasks over the
stage's outputs (every row, by what was planted in it and the reason it got).

Prints one JSON object: ``rows``, ``seconds`` and ``rows_per_s`` of the stage, its
``step_seconds``, ``driver_peak_rss_mb``, and per planted kind ``planted`` / ``found`` (rows
with the expected reason) / ``recall``, and ``false_positives`` (clean rows that got a reason).
Targets: every planted exact duplicate and rule violation found; near-duplicates at recall
>= 0.95; the driver under 1 GB.

    python benchmarks/curate_scale.py                 # 1,000,000 rows
    python benchmarks/curate_scale.py --rows 100000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray_pipeline.config import load_config  # noqa: E402
from ray_pipeline.data import synthetic  # noqa: E402
from ray_pipeline.data.prompts import Prompt  # noqa: E402
from ray_pipeline.data.schema import dumps, new_row, row_id, to_table  # noqa: E402
from ray_pipeline.run_state import open_run  # noqa: E402

# Planted kinds and their share of the rows (the rest are clean), with the reason expected.
PLANTS = {
    "exact_duplicate": (0.03, "duplicate"),
    "near_duplicate": (0.03, "near_duplicate"),
    "too_short": (0.01, "too_short"),
    "too_long": (0.005, "too_long"),
    "excluded_pattern": (0.01, "excluded_pattern"),
    "refusal": (0.005, "refusal"),
    "invalid_label": (0.005, "invalid_label"),
}
SOURCES = 4
VOCAB = [
    a + b + c
    for a in "bcdfglmnprstvz"
    for b in ("a", "e", "i", "o", "u", "ai", "ou")
    for c in ("", "n", "r", "s", "l", "nd", "st", "x")
]
VOCAB_INDEX = {w: k for k, w in enumerate(VOCAB)}
CURATE = {
    "rules": {"min_chars": 20, "max_chars": 2000, "deny_patterns": ["https?://spam"]},
    "dedup": {"exact": True, "near": {"enabled": True, "threshold": 0.7, "ngram": 5}},
    "samples_per_reason": 20,
}


def unit(*keys: object) -> float:
    digest = hashlib.blake2b("\x00".join(map(str, keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def kind_of(i: int) -> str:
    u, edge = unit("kind", i), 0.0
    for kind, (share, _) in PLANTS.items():
        edge += share
        if u < edge:
            return kind
    return "clean"


def base_text(j: int) -> str:
    """30 words of row j, drawn by a hash (distinct rows share few 5-grams)."""
    digest = hashlib.blake2b(str(j).encode(), digest_size=60).digest()
    return " ".join(
        VOCAB[int.from_bytes(digest[k : k + 2], "big") % len(VOCAB)] for k in range(0, 60, 2)
    )


def source_of(i: int, rows: int) -> tuple[str, int]:
    per = -(-rows // SOURCES)
    return f"bench/logs-{i // per}.jsonl", i % per + 1


def earlier_clean(i: int) -> int | None:
    """A clean row before row i (what a duplicate copies), or None."""
    if i == 0:
        return None
    j = int(unit("base", i) * i)
    while j >= 0 and kind_of(j) != "clean":
        j -= 1
    return j if j >= 0 else None


def plant(i: int) -> tuple[str, str, str]:
    """(kind, input text, recorded answer) of row i."""
    kind = kind_of(i)
    answer = '{"toxic": 0}'
    j = earlier_clean(i) if kind in ("exact_duplicate", "near_duplicate") else None
    if kind in ("exact_duplicate", "near_duplicate") and j is None:
        kind = "clean"
    if kind == "exact_duplicate":
        text = "  ".join(base_text(j).upper().split(" "))
    elif kind == "near_duplicate":
        words = base_text(j).split(" ")
        at = int(unit("at", i) * len(words))
        words[at] = VOCAB[(VOCAB_INDEX[words[at]] + 1 + int(unit("w", i) * 50)) % len(VOCAB)]
        text = " ".join(words)
    elif kind == "too_short":
        text = f"ok {i % 1000}"
    elif kind == "too_long":
        text = " ".join([base_text(i)] * 20)
    elif kind == "excluded_pattern":
        text = base_text(i) + f" see http://spam.example/{i}"
    elif kind == "refusal":
        text, answer = base_text(i), '{"toxic": 0} As an AI language model, I cannot judge this.'
    elif kind == "invalid_label":
        text, answer = base_text(i), '{"toxic": 7}'
    else:
        text = base_text(i)
    return kind, text, answer


def make_rows(batch: dict[str, np.ndarray], rows: int) -> pa.Table:
    """Generated rows (as the generate stage writes them) for row numbers `batch['id']`."""
    from ray_pipeline.teacher.parse import parse_rows

    task = load_config(data=_config_data(Path("."))).task
    prompt = Prompt.from_task(task)
    out = []
    for i in batch["id"].tolist():
        kind, text, answer = plant(i)
        source, line = source_of(i, rows)
        out.append(
            new_row(
                id=row_id(source, text),
                source=source,
                source_line=line,
                input=text,
                messages=dumps(prompt.messages(text)),
                prompt_hash=prompt.hash,
                teacher="recorded:answer",
                response=answer,
                user=f"plant:{kind}",
            )
        )
    return to_table(parse_rows(out, task))


def _config_data(out: Path) -> dict:
    return {
        "run": {"name": "curate-scale", "output_dir": str(out), "run_id": "bench"},
        "task": synthetic.TASK,
        "teacher": {"simulator": {"enabled": True}},
        # The rows are written as the generate stage's output; the log is named in the manifest.
        "data": {"logs": [{"path": str(out / "logs.jsonl")}]},
        "curate": CURATE,
    }


def _found(batch: pa.Table) -> pa.Table:
    counts = Counter(
        (user.removeprefix("plant:"), (reason or "ok").split(":")[0])
        for user, reason in zip(batch["user"].to_pylist(), batch["reason"].to_pylist(), strict=True)
    )
    return pa.table(
        {
            "kind": [k for k, _ in counts],
            "reason": [r for _, r in counts],
            "n": list(counts.values()),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="Keep the run folder.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from ray_pipeline.curate.stage import run_curate

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = Path(tempfile.mkdtemp(prefix="curate-scale-"))
    try:
        (out / "logs.jsonl").write_text("")
        cfg = load_config(data=_config_data(out))
        run = open_run(cfg, "bench")
        started = time.perf_counter()
        ray.data.range(args.rows, override_num_blocks=max(4, args.rows // 25_000)).map_batches(
            make_rows, fn_kwargs={"rows": args.rows}, batch_format="numpy", batch_size=25_000
        ).write_parquet(str(run.paths.generated_rows))
        written_s = time.perf_counter() - started
        run.write_section(
            "generate",
            {
                "rows": args.rows,
                "status": {"ok": args.rows},
                "teacher_calls": 0,
                "cache_hits": 0,
                "recorded_responses": args.rows,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "cost_usd": 0.0,
                "seconds": round(written_s, 1),
                "reasons": {},
            },  # fmt: skip
        )

        started = time.perf_counter()
        section = run_curate(run)
        seconds = time.perf_counter() - started
        driver_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        found: Counter = Counter()
        outputs = [section["outputs"]["train"], section["outputs"]["rejected"]]
        for r in (
            ray.data.read_parquet(outputs)
            .select_columns(["user", "reason"])
            .map_batches(_found, batch_format="pyarrow")
            .take_all()
        ):
            found[(r["kind"], r["reason"])] += r["n"]
        planted = Counter()
        for (kind, _), n in found.items():
            planted[kind] += n
        result: dict = {
            "rows": args.rows,
            "seconds": round(seconds, 1),
            "rows_per_s": round(args.rows / seconds, 1),
            "step_seconds": section["step_seconds"],
            "driver_peak_rss_mb": round(driver_peak_mb, 1),
            "write_input_s": round(written_s, 1),
            "kept": section["kept"],
            "reasons": section["reasons"],
            "planted": {},
        }
        for kind, (_, reason) in PLANTS.items():
            hit = found[(kind, reason)]
            result["planted"][kind] = {
                "planted": planted[kind],
                "found": hit,
                "recall": round(hit / planted[kind], 4) if planted[kind] else None,
                "other_reasons": {r: n for (k, r), n in found.items() if k == kind and r != reason},
            }
        result["false_positives"] = {
            r: n for (k, r), n in found.items() if k == "clean" and r != "ok"
        }
        result["targets_met"] = {
            "exact_and_rules_all_found": all(
                v["recall"] == 1.0 for k, v in result["planted"].items() if k != "near_duplicate"
            ),
            "near_duplicate_recall_ge_0.95": result["planted"]["near_duplicate"]["recall"] >= 0.95,
            "driver_under_1gb": driver_peak_mb < 1024,
        }
        print(json.dumps(result, indent=2))
    finally:
        if args.keep:
            print(f"run folder: {out}", file=sys.stderr)
        else:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
