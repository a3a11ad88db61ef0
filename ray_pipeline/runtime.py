"""The Ray connection: join a cluster, or start an embedded one."""

from __future__ import annotations

import logging
import os

from ray_pipeline.config import DistillConfig
from ray_pipeline.run_state import RAY_JOB_ENV

log = logging.getLogger("distill")


def init_ray(cfg: DistillConfig, address: str | None = None) -> None:
    """Join the cluster at `address` / ray.address / RAY_ADDRESS, or start an embedded one."""
    import ray

    if ray.is_initialized():
        return
    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Under `ray job submit` the job's runtime_env (working_dir with this project) already
        # applies, and one given here would replace it: ray.runtime_env is for joining a
        # cluster from outside a job.
        in_job = RAY_JOB_ENV in os.environ
        if in_job and cfg.ray.runtime_env:
            log.warning("ray.runtime_env is ignored in a Ray job: give it to the job instead")
        runtime_env = None if in_job else (cfg.ray.runtime_env or None)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # address="local": always a new embedded cluster, never one that happens to run here.
        # The dashboard (on 127.0.0.1; the next free port when 8265 is taken) serves Ray's
        # state API, which Ray Train's placement-group cleaner polls every second: without
        # it every training run logs a warning a second. It adds no measurable start time.
        ray.init(
            address="local",
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
        )
    log.info("ray: %s", ray.cluster_resources())
