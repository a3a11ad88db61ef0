"""What every stage shares: the run folder, the Ray connection and the teacher endpoint."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ray_pipeline.config import DistillConfig, dump_config

log = logging.getLogger("distill")


@dataclass
class Run:
    """A run folder, runs/<run_id>/, holding every stage's outputs and the report."""

    cfg: DistillConfig
    run_id: str
    dir: Path
    # The run's teacher quota actor (budget, rate limits, progress), shared by the stages of
    # this invocation; created by the first stage that calls the teacher.
    quota: Any = None

    def stage_dir(self, stage: str) -> Path:
        path = self.dir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def config_file(self) -> Path:
        return self.dir / "config.yaml"


def open_run(cfg: DistillConfig, run_id: str | None = None) -> Run:
    """Create (or re-open) runs/<run_id>/ and write the resolved config into it."""
    run_id = run_id or cfg.run.run_id or f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = (Path(cfg.run.output_dir) / run_id).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(cfg=cfg, run_id=run_id, dir=run_dir)
    run.config_file.write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False))
    return run


def init_ray(cfg: DistillConfig, address: str | None = None) -> None:
    """Join the cluster at `address` / ray.address / RAY_ADDRESS, or start an embedded one."""
    import ray

    if ray.is_initialized():
        return
    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Under `ray job submit` the job's runtime_env (working_dir with this project) already
        # applies; ray.runtime_env is for joining a cluster from outside a job.
        ray.init(address=address, runtime_env=cfg.ray.runtime_env or None, log_to_driver=True)
    else:
        # address="local": always a new embedded cluster, never one that happens to run here.
        ray.init(
            address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True
        )
    log.info("ray: %s", ray.cluster_resources())


@dataclass(frozen=True)
class TeacherEndpoint:
    base_url: str
    api_key: str  # never logged or written


@contextlib.contextmanager
def teacher_endpoint(run: Run) -> Iterator[TeacherEndpoint]:
    """The teacher to call: the built-in simulator (started now, stopped on exit) or the
    configured endpoint with its key from the environment."""
    from ray_pipeline.teacher.simulator import running_simulator

    t = run.cfg.teacher
    if t.simulator.enabled:
        with running_simulator(run.config_file, t.simulator.host, t.simulator.port) as url:
            log.info("teacher simulator at %s", url)
            yield TeacherEndpoint(base_url=url, api_key="simulator")
        return
    key = os.environ.get(t.api_key_env)
    if not key:
        raise RuntimeError(
            f"teacher.api_key_env: the environment variable {t.api_key_env} is not set "
            f"(it must hold the API key for {t.base_url})"
        )
    yield TeacherEndpoint(base_url=t.base_url, api_key=key)
