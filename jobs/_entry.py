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
    if stage == "generate":
        parser.add_argument(
            "--retry-failed", action="store_true", help="re-send only the rows the teacher failed"
        )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = list(args.set)
    if stage == "serve" and not any(o.startswith("serve.keep_running=") for o in overrides):
        overrides.insert(0, "serve.keep_running=true")  # the serve job is a long-running server
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    from ray_pipeline.pipeline import RunStopped, latest_run_id, run_all, run_stages

    retry = getattr(args, "retry_failed", False)
    try:
        if stage == "distill":
            run = run_all(cfg, args.run_id, args.address)
        else:
            run_id = args.run_id or (
                None if stage == "generate" and not retry else latest_run_id(cfg)
            )
            run = run_stages(
                cfg, [stage], run_id, args.address, {"generate": {"retry_failed": retry}}
            )
    except RunStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(3)
    print(f"report: {run.dir / 'report.md'}")
