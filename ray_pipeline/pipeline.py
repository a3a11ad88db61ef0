"""The whole loop and its single stages, as library functions.

``distill run`` / ``python -m jobs.distill`` call ``run_all``; the per-stage commands and jobs
call ``run_stage``. Every stage writes its section of runs/<id>/report.json as soon as it ends,
so a run that stops part-way keeps what it did, and a later stage command continues it.
"""

from __future__ import annotations

import logging
import time

from ray_pipeline.config import DistillConfig
from ray_pipeline.run_state import STAGES, Run, open_run
from ray_pipeline.runtime import init_ray
from ray_pipeline.teacher.session import teacher_endpoint

log = logging.getLogger("distill")

NEEDS_TEACHER = {"generate", "evaluate", "serve"}


def needs_teacher(cfg: DistillConfig, stages: list[str]) -> bool:
    """Whether one of `stages` calls the teacher (curate does when its judge is on)."""
    return bool(NEEDS_TEACHER & set(stages)) or ("curate" in stages and cfg.curate.judge.enabled)


def _stage(stage: str, run: Run, endpoint, **options) -> dict:
    # Imported here: each stage pulls in its own heavy libraries (torch, deepspeed, serve).
    if stage == "generate":
        from ray_pipeline.generate.stage import run_generate

        return run_generate(run, endpoint, **options)
    if stage == "curate":
        from ray_pipeline.curate.stage import run_curate

        return run_curate(run, endpoint)
    if stage == "train":
        from ray_pipeline.train.stage import run_train

        return run_train(run)
    if stage == "sweep":
        from ray_pipeline.sweep.stage import run_sweep

        return run_sweep(run)
    if stage == "evaluate":
        from ray_pipeline.evaluate.stage import run_evaluate

        return run_evaluate(run, endpoint)
    if stage == "serve":
        from ray_pipeline.serving.stage import run_serve

        return run_serve(run, endpoint)
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


class RunStopped(RuntimeError):
    """A stage stopped the run on purpose (e.g. the teacher budget is spent); what was done
    so far is written and a re-run continues from it."""


def _run_stages(run: Run, stages: list[str], endpoint, options: dict | None = None) -> None:
    for stage in stages:
        started = time.perf_counter()
        log.info("=== %s ===", stage)
        section = _stage(stage, run, endpoint, **(options or {}).get(stage, {}))
        section.setdefault("seconds", round(time.perf_counter() - started, 2))
        run.write_section(stage, section)
        if section.get("budget_stop"):
            failed = section["reasons"].get("budget_exhausted", 0)
            raise RunStopped(
                f"teacher budget reached in {stage}: {section['budget_stop']}. {failed} rows were "
                f"not sent; everything else is written in {run.location}. Raise teacher.budget and "
                f"re-run (answers already paid for come from the cache), or run "
                f"`distill generate CONFIG --retry-failed --run-id {run.run_id}`."
            )


def run_stages(
    cfg: DistillConfig,
    stages: list[str],
    run_id: str | None = None,
    address: str | None = None,
    options: dict | None = None,
) -> Run:
    """Run `stages` in order in one run folder, starting the teacher only if one needs it.
    `options`: per-stage keyword arguments, e.g. {"generate": {"retry_failed": True}}."""
    run = open_run(cfg, run_id)
    if run.uri is not None:
        log.info("run %s in %s (mirrored in %s)", run.run_id, run.uri, run.dir)
    else:
        log.info("run %s in %s", run.run_id, run.dir)
    init_ray(cfg, address)
    if needs_teacher(cfg, stages):
        with teacher_endpoint(run) as endpoint:
            _run_stages(run, stages, endpoint, options)
    else:
        _run_stages(run, stages, None, options)
    return run


def loop_stages(cfg: DistillConfig, until: str | None = None) -> list[str]:
    """The stages of the whole loop for this config: generate, curate, train, sweep (when
    configured), evaluate, serve (when enabled); with `until`, only up to that stage."""
    stages = ["generate", "curate", "train"]
    if cfg.sweep is not None:
        stages.append("sweep")
    stages.append("evaluate")
    if cfg.serve.enabled:
        stages.append("serve")
    if until is None:
        return stages
    if until not in stages:
        raise ValueError(f"until={until!r}: this config runs the stages {', '.join(stages)}")
    return stages[: stages.index(until) + 1]


def run_all(
    cfg: DistillConfig,
    run_id: str | None = None,
    address: str | None = None,
    until: str | None = None,
) -> Run:
    """The whole loop (``loop_stages``), e.g. up to 'curate' to build the dataset only."""
    run = run_stages(cfg, loop_stages(cfg, until), run_id, address)
    log.info("report: %s", run.report_location)
    return run
