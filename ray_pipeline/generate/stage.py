"""Generate stage (Ray Data): logs + seed expansions -> teacher answers -> parsed rows.

Output: runs/<id>/generate/rows/ (Parquet, exactly one row per input record: ok, or failed
with the error) and malformed.jsonl (the log records that could not be read, with file and
line). ``retry_failed`` re-sends only the rows a previous run of this stage left failed by the
teacher (errors, budget), keeping every other row as it was.

Money: a row's ``cost`` (and tokens) is what this run paid for it (every teacher and sample;
nothing for an answer from the cache); rows answered in the logs have no cost. The section's
``cost_usd`` is the sum over the rows plus the seed expansion's requests: for a fresh run it
equals the quota's spend to the pico-dollar.
"""

from __future__ import annotations

import functools
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
from ray_pipeline.data.schema import FAILED, OK, to_table
from ray_pipeline.data.sources import UNREADABLE, log_blocks
from ray_pipeline.generate.seeds import expand_seeds
from ray_pipeline.run_state import Run
from ray_pipeline.storage import file_size, is_uri
from ray_pipeline.teacher.caller import TeacherEndpoint
from ray_pipeline.teacher.parse import parse_batch
from ray_pipeline.teacher.quota import from_pico, to_pico
from ray_pipeline.teacher.session import TeacherSession

log = logging.getLogger("distill.generate")

RETRYABLE_REASONS = ("teacher_error", "budget_exhausted")
# Ray Data's default block (128 MiB) made a worker hold ~1 GB while reading a 1 GB log
# (benchmarks/log_read_memory.py); rows are small, 16 MiB blocks stream just as fast.
LOG_BLOCK_BYTES = 16 * 2**20


def log_datasource(sources: list[LogSource], task: TaskSection, block_rows: int) -> Any:
    """A Ray Data source of the log files: one read task per file, each streaming its file
    in tables of `block_rows` rows (``sources.log_blocks``)."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class LogDatasource(Datasource):
        def get_read_tasks(self, parallelism: int, **_: Any) -> list[ReadTask]:
            tasks = []
            for src in sources:
                # Made absolute here, on the driver: a worker has its own working directory.
                path = src.path if is_uri(src.path) else str(Path(src.path).absolute())
                tasks.append(
                    ReadTask(
                        functools.partial(log_blocks, src, task, block_rows, path),
                        BlockMetadata(
                            num_rows=None,
                            size_bytes=file_size(path),
                            exec_stats=None,
                            input_files=(str(path),),
                        ),
                    )
                )
            return tasks

        def estimate_inmemory_data_size(self) -> int:
            return sum(file_size(src.path) for src in sources)

    return LogDatasource()


def read_logs(run: Run) -> Any:
    """The configured log files as one Ray Dataset of rows (None when there are none)."""
    import ray

    logs = run.cfg.data.logs
    for i, src in enumerate(logs):
        try:
            file_size(src.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"data.logs.{i}.path: {src.path} is not a file") from None
    if not logs:
        return None
    # The read task hands rows over 1,024 at a time; Ray Data gathers them into blocks of at
    # most LOG_BLOCK_BYTES: what a read task (and each later task) holds of a file at once.
    source = log_datasource(logs, run.cfg.task, 1024)
    ctx = ray.data.DataContext.get_current()
    previous = ctx.target_max_block_size
    ctx.target_max_block_size = min(previous or LOG_BLOCK_BYTES, LOG_BLOCK_BYTES)
    try:  # a dataset keeps the context it was made under
        # Reading is light next to the teacher actors starting beside it: a quarter of a CPU.
        return ray.data.read_datasource(source, override_num_blocks=len(logs), num_cpus=0.25)
    finally:
        ctx.target_max_block_size = previous


def _reset_for_retry(batch: pa.Table) -> pa.Table:
    rows = batch.to_pylist()
    for r in rows:
        if r["status"] == FAILED and (r["reason"] or "").startswith(RETRYABLE_REASONS):
            r.update(
                status=OK,
                reason=None,
                error_class=None,
                status_code=None,
                attempts=None,
                response=None,
                teacher_logprobs=None,
                output=None,
                label=None,
            )
    return to_table(rows)


def run_generate(run: Run, endpoint: TeacherEndpoint, retry_failed: bool = False) -> dict[str, Any]:
    import ray

    started = time.perf_counter()
    out = run.stage_dir("generate")
    rows_dir = run.paths.generated_rows
    session = TeacherSession(run, endpoint)
    synthetic: dict[str, Any] = {}
    tmp_dir = out / "rows.writing"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    with session.progress():
        if retry_failed:
            previous = run.require("generate")
            ds = (
                ray.data.read_parquet(run.shared(rows_dir))
                .map_batches(_reset_for_retry, batch_format="pyarrow")
                .repartition(target_num_rows_per_block=session.block_rows)
            )
            synthetic = previous.get("synthetic", {})
        else:
            ds = read_logs(run)
            if run.cfg.data.seeds is not None:
                rows, synthetic = expand_seeds(run, session)
                if rows:
                    new = session.dataset(to_table(rows))
                    ds = new if ds is None else ds.union(new)
        # Only the rows' own answers carry logprobs (not the seed expansion's requests).
        ds = session.pool(ds, params=run.cfg.teacher.logprob_params())
        ds = ds.map_batches(parse_batch, fn_kwargs={"task": run.cfg.task}, batch_format="pyarrow")
        ds.write_parquet(str(tmp_dir), ray_remote_args=run.write_args())
    # Swap in the new rows only once they are complete: a killed run leaves the old ones.
    shutil.rmtree(rows_dir, ignore_errors=True)
    tmp_dir.mkdir(exist_ok=True)  # an empty result writes no files
    tmp_dir.rename(rows_dir)
    table = pq.read_table(rows_dir)
    seconds = time.perf_counter() - started

    quota = session.snapshot()
    section = summarize_rows(table, seconds, synthetic if not retry_failed else {})
    section["synthetic"] = synthetic
    section["retry_failed"] = retry_failed
    section["quota"] = {
        k: quota[k]
        for k in (
            "calls",
            "cache_hits",
            "rate_limited",
            "storms",
            "over_estimate",
            "tokens",
            "cost_usd",
            "budget_stop",
        )
    }
    section["malformed_records"] = write_malformed(table, run.paths.malformed)
    section["outputs"] = {"rows": str(rows_dir), "malformed": str(run.paths.malformed)}
    if quota["budget_stop"]:
        section["budget_stop"] = quota["budget_stop"]
    log.info("generate: %s rows in %.1fs (%s)", section["rows"], seconds, section["status"])
    return section


def write_malformed(table: pa.Table, path) -> int:
    """The log records that could not be read, by file and line, for a person to fix."""
    cols = table.select(["status", "reason", "source", "source_line", "input"]).to_pylist()
    bad = [r for r in cols if r["status"] == FAILED and (r["reason"] or "").startswith(UNREADABLE)]
    with open(path, "w") as f:
        for r in sorted(bad, key=lambda r: (r["source"], r["source_line"])):
            record = {
                "source": r["source"],
                "line": r["source_line"],
                "error": r["reason"],
                "text": r["input"],
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(bad)


def summarize_rows(
    table: pa.Table, seconds: float, expansion: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Counts, tokens, cost and rates of a generate output table, totals per teacher model.
    Tokens and cost are this run's spend: the rows' (those with a cost: asked this run) plus
    the seed expansion's requests (`expansion`)."""
    cols = table.select(
        ["status", "reason", "attempts", "prompt_tokens", "completion_tokens", "cost"]
        + ["teacher", "response", "cached"]
    ).to_pylist()
    status = Counter(r["status"] for r in cols)
    reasons = Counter((r["reason"] or "").split(":")[0] for r in cols if r["reason"])
    per_teacher: dict[str, dict[str, Any]] = {}
    for r in cols:
        if r["cost"] is None:
            continue  # answered in the logs, or never readable
        t = per_teacher.setdefault(
            r["teacher"] or "?",
            {"rows": 0, "prompt_tokens": 0, "completion_tokens": 0, "pico": 0, "cached": 0},
        )
        t["rows"] += 1
        t["prompt_tokens"] += r["prompt_tokens"] or 0
        t["completion_tokens"] += r["completion_tokens"] or 0
        t["pico"] += to_pico(r["cost"])
        t["cached"] += bool(r["cached"])
    expansion = expansion or {}
    pico = sum(t["pico"] for t in per_teacher.values()) + to_pico(expansion.get("cost_usd", 0.0))
    for t in per_teacher.values():
        t["cost_usd"] = from_pico(t.pop("pico"))
    return {
        "rows": table.num_rows,
        "status": dict(status),
        "reasons": dict(reasons),
        # Rows whose main answer came from a request this run (voters' calls: quota.calls).
        "teacher_calls": sum(1 for r in cols if r["attempts"] is not None and not r["cached"]),
        "teacher_attempts": sum(r["attempts"] or 0 for r in cols if not r["cached"]),
        "cache_hits": sum(1 for r in cols if r["cached"]),
        "recorded_responses": sum(
            1 for r in cols if r["response"] is not None and r["cost"] is None
        ),
        "prompt_tokens": sum(t["prompt_tokens"] for t in per_teacher.values())
        + expansion.get("prompt_tokens", 0),
        "completion_tokens": sum(t["completion_tokens"] for t in per_teacher.values())
        + expansion.get("completion_tokens", 0),
        "cost_usd": from_pico(pico),
        "per_teacher": per_teacher,
        "seconds": round(seconds, 2),
        "rows_per_s": round(table.num_rows / seconds, 1) if seconds > 0 else None,
    }
