"""Generate stage (Ray Data): logs + seed expansions -> teacher answers -> parsed rows.

Output: runs/<id>/generate/rows/ (Parquet, exactly one row per input record: ok, or failed
with the error) and malformed.jsonl (the log records that could not be read, with file and
line). ``retry_failed`` re-sends only the rows a previous run of this stage left failed by the
teacher (errors, budget), keeping every other row as it was.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ray_pipeline.config import LogSource, TaskSection
from ray_pipeline.data.schema import FAILED, OK, to_table
from ray_pipeline.data.sources import MALFORMED, log_rows, read_texts
from ray_pipeline.evaluate.report import load_report, require
from ray_pipeline.generate.teacher_calls import (
    TeacherCaller,
    ask_specs,
    expansion_rows,
    parse_rows,
    synthetic_input_rows,
)
from ray_pipeline.runtime import Run, TeacherEndpoint
from ray_pipeline.teacher.prompts import Prompt
from ray_pipeline.teacher.quota import BudgetExhausted, Quota

log = logging.getLogger("distill.generate")

RETRYABLE_REASONS = ("teacher_error", "budget_exhausted")


def _read_log_batch(batch: pa.Table, src: LogSource, source: str, task: TaskSection) -> pa.Table:
    prompt = Prompt.from_task(task)
    rows = []
    for rec in batch.to_pylist():
        rows.extend(log_rows(rec["bytes"], source, src, prompt, task))
    return to_table(rows)


def parse_batch(batch: pa.Table, task: TaskSection) -> pa.Table:
    return to_table(parse_rows(batch.to_pylist(), task))


def cache_dir(run: Run) -> str | None:
    c = run.cfg.teacher.cache
    if not c.enabled:
        return None
    return str(
        Path(c.dir)
        if c.dir is not None
        else Path(run.cfg.run.output_dir).absolute() / "cache" / "teacher"
    )


class TeacherSession:
    """The teacher as the stages use it: the resolved endpoints, the run's shared quota actor
    (rate limits, budget, progress), the response cache and the actor pool."""

    def __init__(self, run: Run, endpoint: TeacherEndpoint):
        import ray

        self.run = run
        self.endpoint = endpoint
        t = run.cfg.teacher
        self.simulator = t.simulator.enabled
        # One quota per invocation, shared by every stage and actor that calls the teacher
        # (a new invocation, e.g. with a bigger budget, starts from its own config).
        if run.quota is None:
            specs = ask_specs(t, endpoint.base_url, endpoint.api_key, self.simulator)
            limits = {spec.endpoint: {} for spec in specs}
            # The configured rate limit is the main teacher's endpoint's (specs[0]).
            limits[specs[0].endpoint] = {"rpm": t.rate_limit.rpm, "tpm": t.rate_limit.tpm}
            run.quota = (
                ray.remote(Quota)
                .options(num_cpus=0)
                .remote(
                    limits,
                    t.budget.max_cost_usd,
                    t.budget.max_tokens,
                    t.rate_limit.storm_share,
                    t.rate_limit.storm_window_s,
                )
            )
        self.quota = run.quota

    def pool(self, ds, params: dict[str, Any] | None = None, voters: bool = True):
        """`ds` with every row that needs one answered by the teacher, through an actor pool."""
        import ray

        t = self.run.cfg.teacher
        specs = ask_specs(
            t, self.endpoint.base_url, self.endpoint.api_key, self.simulator, params, voters
        )
        # Blocks of a few batches: every actor of the pool gets work, even from one big file.
        ds = ds.repartition(target_num_rows_per_block=4 * t.batch_size)
        return ds.map_batches(
            TeacherCaller,
            fn_constructor_kwargs={
                "specs": specs,
                "teacher": t.model_dump(mode="json"),
                "quota": self.quota,
                "cache_dir": cache_dir(self.run),
            },
            batch_format="pyarrow",
            batch_size=t.batch_size,
            # Two blocks at once per actor: the next block's requests start while the last
            # answers of the previous one are still coming in.
            compute=ray.data.ActorPoolStrategy(size=t.actors, max_concurrent_calls_per_actor=2),
            num_cpus=t.num_cpus_per_actor,
        )

    def snapshot(self) -> dict[str, Any]:
        import ray

        return ray.get(self.quota.snapshot.remote())

    def progress(self, every_s: float = 5.0) -> _Progress:
        return _Progress(self, every_s)


class _Progress:
    """A live line: rows done, rows/s, calls, cache hits, errors, tokens, cost."""

    def __init__(self, session: TeacherSession, every_s: float):
        self.session = session
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="teacher-progress")

    def _line(self) -> str:
        s = self.session.snapshot()
        return (
            f"teacher: {s['rows_done']} rows ({s['rows_per_s']:.1f}/s), {s['calls']} calls, "
            f"{s['cache_hits']} cache hits, {s['errors']} errors, {s['rate_limited']} rate-limited, "
            f"{s['tokens']} tokens, ${s['cost_usd']:.4f}"
        )

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            log.info(self._line())

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        log.info(self._line())


def read_logs(run: Run) -> list:
    """One Ray Dataset of rows per configured log file (one read task per file)."""
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


def expand_seeds(run: Run, session: TeacherSession) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """New input rows from the seed examples, and the counts of the expansion."""
    import ray

    sc = run.cfg.data.seeds
    seeds = [r[sc.input_field] for r in read_texts(sc.path, sc.input_field)]
    requests = expansion_rows(seeds, sc, run.cfg.task, run.cfg.run.seed)
    if not requests:
        return [], {"requests": 0}
    answered = session.pool(
        ray.data.from_arrow(to_table(requests)),
        params={"temperature": sc.temperature, "n": 1},
        voters=False,
    ).take_all()
    rows, counts = synthetic_input_rows(answered, seeds, sc, Prompt.from_task(run.cfg.task))
    counts["seeds"] = len(seeds)
    log.info("seed expansion: %s", counts)
    return rows, counts


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
                output=None,
                label=None,
            )
    return to_table(rows)


def run_generate(run: Run, endpoint: TeacherEndpoint, retry_failed: bool = False) -> dict[str, Any]:
    import ray

    started = time.perf_counter()
    out = run.stage_dir("generate")
    rows_dir = out / "rows"
    session = TeacherSession(run, endpoint)
    synthetic: dict[str, int] = {}
    tmp_dir = out / "rows.writing"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    with session.progress():
        if retry_failed:
            previous = require(load_report(run.dir), "generate", run.dir)
            ds = ray.data.read_parquet(previous["outputs"]["rows"]).map_batches(
                _reset_for_retry, batch_format="pyarrow"
            )
            synthetic = previous.get("synthetic", {})
        else:
            parts = read_logs(run)
            if run.cfg.data.seeds is not None:
                rows, synthetic = expand_seeds(run, session)
                if rows:
                    parts.append(ray.data.from_arrow(to_table(rows)))
            ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        ds = session.pool(ds)
        ds = ds.map_batches(parse_batch, fn_kwargs={"task": run.cfg.task}, batch_format="pyarrow")
        ds.write_parquet(str(tmp_dir))
    # Swap in the new rows only once they are complete: a killed run leaves the old ones.
    shutil.rmtree(rows_dir, ignore_errors=True)
    tmp_dir.mkdir(exist_ok=True)  # an empty result writes no files
    tmp_dir.rename(rows_dir)
    table = pq.read_table(rows_dir)
    seconds = time.perf_counter() - started

    quota = session.snapshot()
    section = summarize_rows(table, seconds)
    section["synthetic"] = synthetic
    section["retry_failed"] = retry_failed
    section["quota"] = {
        k: quota[k]
        for k in (
            "calls",
            "cache_hits",
            "rate_limited",
            "storms",
            "tokens",
            "cost_usd",
            "budget_stop",
        )
    }
    malformed = [
        r
        for r in table.select(["status", "reason", "source", "source_line", "input"]).to_pylist()
        if r["status"] == FAILED and (r["reason"] or "").startswith(MALFORMED)
    ]
    malformed_path = out / "malformed.jsonl"
    with malformed_path.open("w") as f:
        for r in sorted(malformed, key=lambda r: (r["source"], r["source_line"])):
            f.write(
                json.dumps(
                    {
                        "source": r["source"],
                        "line": r["source_line"],
                        "error": r["reason"],
                        "text": r["input"],
                    }
                )
                + "\n"
            )
    section["malformed_records"] = len(malformed)
    section["outputs"] = {"rows": str(rows_dir), "malformed": str(malformed_path)}
    if quota["budget_stop"]:
        section["budget_stop"] = quota["budget_stop"]
    log.info("generate: %s rows in %.1fs (%s)", section["rows"], seconds, section["status"])
    return section


def summarize_rows(table: pa.Table, seconds: float) -> dict[str, Any]:
    """Counts, tokens, cost and rates of a generate output table, totals per teacher model."""
    cols = table.select(
        [
            "status",
            "reason",
            "attempts",
            "prompt_tokens",
            "completion_tokens",
            "cost",
            "teacher",
            "response",
            "cached",
        ]
    ).to_pylist()
    status = Counter(r["status"] for r in cols)
    reasons = Counter((r["reason"] or "").split(":")[0] for r in cols if r["reason"])
    per_teacher: dict[str, dict[str, float]] = {}
    for r in cols:
        if r["attempts"] is None and not r["cached"]:
            continue  # recorded in the logs, or never sent
        t = per_teacher.setdefault(
            r["teacher"] or "?",
            {"rows": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "cached": 0},
        )
        t["rows"] += 1
        t["prompt_tokens"] += r["prompt_tokens"] or 0
        t["completion_tokens"] += r["completion_tokens"] or 0
        t["cost_usd"] += r["cost"] or 0.0
        t["cached"] += bool(r["cached"])
    return {
        "rows": table.num_rows,
        "status": dict(status),
        "reasons": dict(reasons),
        "teacher_calls": sum(1 for r in cols if r["attempts"] is not None and not r["cached"]),
        "teacher_attempts": sum(r["attempts"] or 0 for r in cols if not r["cached"]),
        "cache_hits": sum(1 for r in cols if r["cached"]),
        "recorded_responses": sum(
            1
            for r in cols
            if r["response"] is not None and r["attempts"] is None and not r["cached"]
        ),
        "prompt_tokens": sum(t["prompt_tokens"] for t in per_teacher.values()),
        "completion_tokens": sum(t["completion_tokens"] for t in per_teacher.values()),
        "cost_usd": round(sum(t["cost_usd"] for t in per_teacher.values()), 6),
        "per_teacher": per_teacher,
        "seconds": round(seconds, 2),
        "rows_per_s": round(table.num_rows / seconds, 1) if seconds > 0 else None,
    }


__all__ = ["BudgetExhausted", "TeacherSession", "parse_batch", "run_generate", "summarize_rows"]
