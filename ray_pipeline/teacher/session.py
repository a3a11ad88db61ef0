"""The teacher as the stages use it: its endpoint (the built-in simulator, started for the
run, or the configured API), the run's shared quota actor, the response cache and the Ray Data
actor pool that asks it about rows, with a progress line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from ray_pipeline import storage
from ray_pipeline.config import DistillConfig
from ray_pipeline.run_state import Run
from ray_pipeline.teacher.caller import TeacherCaller, TeacherEndpoint, ask_specs
from ray_pipeline.teacher.quota import Quota

log = logging.getLogger("distill.teacher")


@contextlib.contextmanager
def teacher_endpoint(run: Run) -> Iterator[TeacherEndpoint]:
    """The teacher to call: the built-in simulator (started now, stopped on exit) or the
    configured endpoint with its key from the environment."""
    with config_endpoint(run.cfg, run.paths.config) as endpoint:
        yield endpoint


@contextlib.contextmanager
def config_endpoint(cfg: DistillConfig, config_file: str | Path) -> Iterator[TeacherEndpoint]:
    """``teacher_endpoint`` of a config with no run folder (`config_file`: the YAML the
    simulator is started from; e.g. the judge of a standalone `distill evaluate`)."""
    from ray_pipeline.teacher.sim_server import simulator_process
    from ray_pipeline.teacher.simulator import simulator_identity

    t = cfg.teacher
    if t.simulator.enabled:
        identity = simulator_identity(cfg)
        with simulator_process(config_file, host=t.simulator.host, port=t.simulator.port) as url:
            log.info("teacher simulator at %s", url)
            yield TeacherEndpoint(base_url=url, api_key="simulator", identity=identity)
        return
    key = os.environ.get(t.api_key_env)
    if not key:
        raise RuntimeError(
            f"teacher.api_key_env: the environment variable {t.api_key_env} is not set "
            f"(it must hold the API key for {t.base_url})"
        )
    yield TeacherEndpoint(base_url=t.base_url, api_key=key, identity=t.base_url.rstrip("/"))


def cache_dir(run: Run) -> str | None:
    c = run.cfg.teacher.cache
    if not c.enabled:
        return None
    # A folder or a cloud URI (ResponseCache takes both); open_run made relative paths absolute.
    if c.dir is not None:
        return c.dir
    out = run.cfg.run.output_dir
    if storage.is_uri(out):
        return storage.join(out, "cache", "teacher")
    return str(Path(out).absolute() / "cache" / "teacher")


class TeacherSession:
    """The teacher as the stages use it: the resolved endpoints, the run's shared quota actor
    (rate limits, budget, progress), the response cache and the actor pool."""

    def __init__(self, run: Run, endpoint: TeacherEndpoint):
        import ray

        self.run = run
        self.endpoint = endpoint
        t = run.cfg.teacher
        # One quota per invocation, shared by every stage and actor that calls the teacher
        # (a new invocation, e.g. with a bigger budget, starts from its own config).
        if run.quota is None:
            specs = ask_specs(t, endpoint)
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

    @property
    def block_rows(self) -> int:
        """Rows per block of a dataset for the pool: a few batches, so that every actor gets
        work at once (a block is one task of one actor)."""
        return 4 * self.run.cfg.teacher.batch_size

    def dataset(self, table: pa.Table):
        """An in-memory table as a dataset in blocks of ``block_rows``: no repartition step
        (a task of its own, on the CPUs the actors are starting on)."""
        import ray

        n = self.block_rows
        return ray.data.from_arrow([table.slice(i, n) for i in range(0, table.num_rows, n)])

    def pool(
        self,
        ds,
        params: dict[str, Any] | None = None,
        voters: bool = True,
        model: str | None = None,
    ):
        """`ds` (in blocks of at most ``block_rows``: see ``dataset``) with every row that
        needs one answered by the teacher, through an actor pool (`model`: another model of
        the teacher's endpoint, e.g. the curate judge)."""
        import ray

        t = self.run.cfg.teacher
        specs = ask_specs(t, self.endpoint, params, voters, model)
        ds = ds.repartition(target_num_rows_per_block=self.block_rows)
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
