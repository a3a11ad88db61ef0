"""The Ray connection: join a cluster, or start an embedded one."""

from __future__ import annotations

import logging
import os

from ray_pipeline.config import DistillConfig

log = logging.getLogger("distill")


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
