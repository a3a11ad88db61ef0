"""Shared argument handling of the job scripts (kept thin: load the config, call the library)."""

from __future__ import annotations

import argparse
import logging
import sys

from ray_pipeline.config import ConfigError, load_config


def job_main(stage: str) -> None:
    """`python -m jobs.<stage> CONFIG [--set k=v ...] [--run-id ID]`; stage 'distill' = all."""
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{stage}")
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-id")
    parser.add_argument("--address")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    from ray_pipeline.pipeline import latest_run_id, run_all, run_stages

    if stage == "distill":
        run = run_all(cfg, args.run_id, args.address)
    else:
        run_id = args.run_id or (None if stage == "generate" else latest_run_id(cfg))
        run = run_stages(cfg, [stage], run_id, args.address)
    print(f"report: {run.dir / 'report.md'}")
