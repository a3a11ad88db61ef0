"""Teacher-call throughput of the generate stage, against the teacher simulator.

Prints one JSON object. Everything is measured in one run, side by side (the machines are
noisy, ratios are what count):

* ``ratio``: the generate stage at 200 ms latency and 64 requests in flight (2 actors x 32)
  over ``--rows`` rows, rows/s over the ideal ``concurrency / latency``;
* ``peak_ratio``: at 20 ms latency and 256 in flight, the stage's rows/s over a bare client
  (one asyncio loop driving ``openai.AsyncOpenAI`` with the aiohttp transport under a
  semaphore) sending the same requests to the same server;
* ``rate_limited_ratio``: with 10% of requests answered 429 (Retry-After: 1) under a
  cluster-wide RPM cap, rows/s over the cap;
* ``rerun_calls``: teacher requests made by an identical second run (the cache answers all);
* ``stage_ratio_5000`` / ``stage_ratio_10000``: at 200 ms and 64 in flight, rows over the
  generate stage's own seconds (reading, the actor pool, writing, the report section: what a
  user waits for), over the ideal; ``fixed_overhead_s_*``: stage seconds minus the seconds
  the server was busy; ``bare_client_wall_ratio_5000``: the same for a bare client loop, by
  its wall clock (a single-process asyncio peer doing the same job).

Rates are the server's view: answered rows over the time from the first request to the last
answer; ``stage_s`` and ``wall_s`` (the whole call, Ray's planning included) are reported
beside them.

    python benchmarks/teacher_throughput.py            # 10,000 rows per scenario
    python benchmarks/teacher_throughput.py --rows 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from ray_pipeline.config import load_config  # noqa: E402
from ray_pipeline.data import synthetic  # noqa: E402
from ray_pipeline.data.prompts import Prompt  # noqa: E402
from ray_pipeline.teacher.sim_server import simulator_process  # noqa: E402

KEY_ENV = "DISTILL_BENCH_KEY"


def sim(url: str, path: str, method: str = "GET") -> dict:
    req = urllib.request.Request(url.removesuffix("/v1") + path, method=method)
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def simulator(tmp: Path, **settings):
    """The simulator with these teacher.simulator settings (a config file, as for a run)."""
    path = tmp / f"sim-{len(list(tmp.glob('sim-*.yaml')))}.yaml"
    data = {
        "task": synthetic.TASK,
        "teacher": {"model": "sim-teacher", "simulator": {"enabled": True, **settings}},
        "data": {"logs": [{"path": "unused.jsonl"}]},
    }
    path.write_text(yaml.safe_dump(data))
    return simulator_process(path)


def write_logs(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"input": t}) + "\n" for t in texts))


def stage_run(url: str, logs: Path, out: Path, run_id: str, teacher: dict) -> dict:
    """One generate stage, as `distill generate` runs it, on the given server."""
    from ray_pipeline.pipeline import run_stages
    from ray_pipeline.run_state import load_report

    cfg = load_config(
        data={
            "run": {"name": "bench", "output_dir": str(out), "run_id": run_id},
            "task": synthetic.TASK,
            "teacher": {
                "base_url": url,
                "model": "sim-teacher",
                "api_key_env": KEY_ENV,
                "max_tokens": 16,
                "cache": {"dir": str(out / "cache")},
                **teacher,
            },
            "data": {"logs": [{"path": str(logs)}]},
        }
    )
    sim(url, "/metrics/reset", "POST")
    started = time.perf_counter()
    run_stages(cfg, ["generate"], run_id)
    wall = time.perf_counter() - started
    m = sim(url, "/metrics")
    gen = load_report(out / run_id)["generate"]
    ok = gen["status"].get("ok", 0)
    return {
        "rows": gen["rows"],
        "ok": ok,
        "failed": gen["status"].get("failed", 0),
        "requests": m["requests"],
        "busy_s": m["busy_s"],
        "rows_per_s": ok / m["busy_s"] if m["busy_s"] else None,
        "stage_s": gen["seconds"],
        "fixed_overhead_s": round(gen["seconds"] - m["busy_s"], 2) if m["busy_s"] else None,
        # Where the fixed cost goes: before the first request, after the last answer.
        "before_first_request_s": m["first_request_after_s"],
        "after_last_answer_s": round(wall - m["last_reply_after_s"], 2)
        if m["last_reply_after_s"] is not None
        else None,
        "wall_s": round(wall, 2),
        "cache_hits": gen["cache_hits"],
    }


def bare_client(url: str, texts: list[str], concurrency: int) -> dict:
    """The reference: one asyncio loop, AsyncOpenAI + aiohttp, a semaphore, same requests."""
    import openai

    prompt = Prompt(synthetic.PROMPT)

    async def main() -> int:
        client = openai.AsyncOpenAI(
            base_url=url, api_key="bench", max_retries=0, http_client=openai.DefaultAioHttpClient()
        )
        sem = asyncio.Semaphore(concurrency)

        async def one(text: str) -> None:
            async with sem:
                await client.chat.completions.create(
                    model="sim-teacher",
                    messages=prompt.messages(text),
                    temperature=0.0,
                    max_tokens=16,
                    n=1,
                )

        await asyncio.gather(*(one(t) for t in texts))
        await client.close()
        return len(texts)

    sim(url, "/metrics/reset", "POST")
    started = time.perf_counter()
    n = asyncio.run(main())
    wall = time.perf_counter() - started
    m = sim(url, "/metrics")
    return {
        "rows": n,
        "busy_s": m["busy_s"],
        "rows_per_s": n / m["busy_s"],
        "wall_s": round(wall, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000, help="rows of the throughput scenarios")
    ap.add_argument(
        "--stage-rows",
        type=int,
        nargs="+",
        default=[5_000, 10_000],
        help="rows of the stage-overhead runs at 200 ms, 64 in flight",
    )
    ap.add_argument("--rate-limited-rows", type=int, default=2_000)
    ap.add_argument(
        "--rpm-cap", type=float, default=6_000.0, help="RPM cap of the rate-limited scenario"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ[KEY_ENV] = "bench"
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp_s:
        tmp = Path(tmp_s)
        texts = synthetic.generate_comments(args.rows, seed=11)
        logs = tmp / "logs.jsonl"
        write_logs(logs, texts)
        # Peak: 20 ms, 256 in flight; the bare client first, then the stage, then the rerun.
        with simulator(tmp, rule="quickstart", latency_ms=20) as url:
            bare = bare_client(url, texts, 256)
            peak_teacher = {"actors": 2, "per_actor_concurrency": 128, "batch_size": 128}
            peak = stage_run(url, logs, tmp / "peak", "peak", peak_teacher)
            rerun = stage_run(url, logs, tmp / "peak", "peak-rerun", peak_teacher)
        # Latency-bound: 200 ms, 64 in flight; the stage at each size, the bare client beside.
        slow_teacher = {"actors": 2, "per_actor_concurrency": 32, "batch_size": 32}
        sized: dict[int, dict] = {}
        with simulator(tmp, rule="quickstart", latency_ms=200) as url:
            for n in sorted({*args.stage_rows, args.rows}):
                n_logs = tmp / f"logs-{n}.jsonl"
                write_logs(n_logs, synthetic.generate_comments(n, seed=11))
                sized[n] = stage_run(url, n_logs, tmp / f"slow-{n}", f"slow-{n}", slow_teacher)
            peer_rows = min(args.stage_rows)
            peer = bare_client(url, synthetic.generate_comments(peer_rows, seed=11), 64)
        slow = sized[args.rows]
        # Rate-limited: an RPM cap shared by the pool, 10% of requests answered 429.
        limited_logs = tmp / "limited.jsonl"
        write_logs(limited_logs, texts[: args.rate_limited_rows])
        faults = {"latency_ms": 50, "rate_429": 0.1, "retry_after_s": 1}
        limit = {"rpm_per_key": args.rpm_cap * 1.1}
        with simulator(tmp, rule="quickstart", **faults, **limit) as url:
            limited_teacher = {
                **slow_teacher,
                "rate_limit": {"rpm": args.rpm_cap},
                "max_attempts": 8,
            }
            limited = stage_run(url, limited_logs, tmp / "limited", "limited", limited_teacher)
    ideal = 64 / 0.2
    cap = args.rpm_cap / 60
    result = {
        "rows": args.rows,
        "rows_per_s": round(slow["rows_per_s"], 1),
        "ideal_rows_per_s": ideal,
        "ratio": round(slow["rows_per_s"] / ideal, 3),
        "peak_rows_per_s": round(peak["rows_per_s"], 1),
        "bare_client_rows_per_s": round(bare["rows_per_s"], 1),
        "peak_ratio": round(peak["rows_per_s"] / bare["rows_per_s"], 3),
        "rate_limited_rows_per_s": round(limited["rows_per_s"], 1),
        "rate_limit_rows_per_s": cap,
        "rate_limited_ratio": round(limited["rows_per_s"] / cap, 3),
        "rerun_calls": rerun["requests"],
        **{f"stage_ratio_{n}": round(n / r["stage_s"] / ideal, 3) for n, r in sized.items()},
        **{f"fixed_overhead_s_{n}": r["fixed_overhead_s"] for n, r in sized.items()},
        f"bare_client_wall_ratio_{peer_rows}": round(peer_rows / peer["wall_s"] / ideal, 3),
        "runs": {
            **{f"slow_200ms_c64_{n}": r for n, r in sized.items()},
            f"bare_client_200ms_c64_{peer_rows}": peer,
            "peak_20ms_c256": peak,
            "bare_client_20ms_c256": bare,
            "rerun": rerun,
            "rate_limited": limited,
        },
    }
    ray.shutdown()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
