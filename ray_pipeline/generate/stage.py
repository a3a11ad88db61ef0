"""Generate stage (Ray Data): logs + seed expansions -> teacher answers -> parsed rows.

Output: runs/<id>/generate/rows/ (Parquet, one row per input record, ok or failed) and
malformed.jsonl (the log records that could not be read, with file and line).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ray_pipeline.config import LogSource, TaskSection
from ray_pipeline.data.schema import FAILED, to_table
from ray_pipeline.data.sources import MALFORMED, log_rows, read_texts
from ray_pipeline.generate.teacher_calls import (
    TeacherCaller,
    expansion_rows,
    parse_rows,
    synthetic_input_rows,
)
from ray_pipeline.runtime import Run, TeacherEndpoint
from ray_pipeline.teacher.prompts import Prompt

log = logging.getLogger("distill.generate")


def _read_log_batch(batch: pa.Table, src: LogSource, source: str, task: TaskSection) -> pa.Table:
    prompt = Prompt.from_task(task)
    rows = []
    for rec in batch.to_pylist():
        rows.extend(log_rows(rec["bytes"], source, src, prompt, task))
    return to_table(rows)


def _parse_batch(batch: pa.Table, task: TaskSection) -> pa.Table:
    return to_table(parse_rows(batch.to_pylist(), task))


def teacher_pool(ds, endpoint: TeacherEndpoint, run: Run, params: dict[str, Any] | None = None):
    """`ds` with every row that needs one answered by the teacher, through an actor pool."""
    t = run.cfg.teacher
    return ds.map_batches(
        TeacherCaller,
        fn_constructor_kwargs={
            "base_url": endpoint.base_url,
            "api_key": endpoint.api_key,
            "teacher": t.model_dump(mode="json"),
            "params": params,
        },
        batch_format="pyarrow",
        batch_size=t.batch_size,
        concurrency=t.actors,
        num_cpus=t.num_cpus_per_actor,
    )


def read_logs(run: Run):
    """One Ray Dataset of rows from every configured log file (one read task per file)."""
    import ray

    parts = []
    for i, src in enumerate(run.cfg.data.logs):
        path = Path(src.path)
        if not path.is_file():
            raise FileNotFoundError(f"data.logs.{i}.path: {path} is not a file")
        parts.append(
            ray.data.read_binary_files(str(path.absolute()), include_paths=True).map_batches(
                _read_log_batch,
                fn_kwargs={"src": src, "source": str(src.path), "task": run.cfg.task},
                batch_format="pyarrow",
                batch_size=1,
            )
        )
    return parts


def expand_seeds(run: Run, endpoint: TeacherEndpoint) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """New input rows from the seed examples, and the counts of the expansion."""
    import ray

    sc = run.cfg.data.seeds
    seeds = [r[sc.input_field] for r in read_texts(sc.path, sc.input_field)]
    requests = expansion_rows(seeds, sc, run.cfg.task, run.cfg.run.seed)
    if not requests:
        return [], {"requests": 0}
    answered = teacher_pool(
        ray.data.from_arrow(to_table(requests)), endpoint, run, params={"temperature": sc.temperature}
    ).take_all()
    rows, counts = synthetic_input_rows(answered, seeds, sc, Prompt.from_task(run.cfg.task))
    counts["seeds"] = len(seeds)
    log.info("seed expansion: %s", counts)
    return rows, counts


def run_generate(run: Run, endpoint: TeacherEndpoint) -> dict[str, Any]:
    import ray

    started = time.perf_counter()
    out = run.stage_dir("generate")
    parts = read_logs(run)
    synthetic: dict[str, int] = {}
    if run.cfg.data.seeds is not None:
        rows, synthetic = expand_seeds(run, endpoint)
        if rows:
            parts.append(ray.data.from_arrow(to_table(rows)))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = teacher_pool(ds, endpoint, run)
    ds = ds.map_batches(_parse_batch, fn_kwargs={"task": run.cfg.task}, batch_format="pyarrow")
    rows_dir = out / "rows"
    shutil.rmtree(rows_dir, ignore_errors=True)  # a re-run replaces, never mixes, outputs
    ds.write_parquet(str(rows_dir))
    seconds = time.perf_counter() - started

    table = pq.read_table(rows_dir)
    section = summarize_rows(table, seconds)
    section["synthetic"] = synthetic
    malformed = [r for r in table.to_pylist() if r["status"] == FAILED and (r["reason"] or "").startswith(MALFORMED)]
    malformed_path = out / "malformed.jsonl"
    with malformed_path.open("w") as f:
        for r in sorted(malformed, key=lambda r: (r["source"], r["source_line"])):
            f.write(json.dumps({"source": r["source"], "line": r["source_line"], "error": r["reason"], "text": r["input"]}) + "\n")
    section["malformed_records"] = len(malformed)
    section["outputs"] = {"rows": str(rows_dir), "malformed": str(malformed_path)}
    log.info("generate: %s rows in %.1fs (%s)", section["rows"], seconds, section["status"])
    return section


def summarize_rows(table: pa.Table, seconds: float) -> dict[str, Any]:
    """Counts, tokens and rates of a generate output table."""
    cols = table.select(["status", "reason", "attempts", "prompt_tokens", "completion_tokens", "teacher", "response"]).to_pylist()
    status = Counter(r["status"] for r in cols)
    reasons = Counter((r["reason"] or "").split(":")[0] for r in cols if r["reason"])
    called = [r for r in cols if r["attempts"] is not None]
    return {
        "rows": table.num_rows,
        "status": dict(status),
        "reasons": dict(reasons),
        "teacher_calls": len(called),
        "teacher_attempts": sum(r["attempts"] for r in called),
        "recorded_responses": sum(1 for r in cols if r["response"] is not None and r["attempts"] is None),
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in called),
        "completion_tokens": sum(r["completion_tokens"] or 0 for r in called),
        "seconds": round(seconds, 2),
        "rows_per_s": round(table.num_rows / seconds, 1) if seconds > 0 else None,
    }
