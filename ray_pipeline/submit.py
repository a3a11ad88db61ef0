"""`distill submit`: run a job of ``jobs/`` on a Ray cluster through the Ray Jobs SDK.

The project travels as the job's working_dir: Ray packs the current folder, leaving out what
``.gitignore`` (and ``.rayignore``) name and what ``EXCLUDES`` names, so never a virtual
environment or run outputs. The logs stream here; the command ends with the job and exits
with the job driver's exit code (0 when it succeeded), after printing where the report is.

No secret travels with the job: a runtime_env is stored by the cluster and shown by its
dashboard, so the teacher's key reaches the workers through the nodes' own environment (a
Kubernetes secret, the cluster launcher's environment), and Ray's token (``RAY_AUTH_MODE=
token`` with ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``) is read by the Jobs SDK from this
machine's environment.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

JOBS = ("distill", "generate", "curate", "train", "sweep", "evaluate", "serve")
# Left out of the upload even where .gitignore does not name them: Ray limits a working_dir
# package to a few hundred MiB, and these are outputs or installs, not the project.
EXCLUDES = [".git/", ".venv/", "venv/", "runs/", "__pycache__/", ".pytest_cache/", ".ruff_cache/"]
SECRET_WORDS = {"KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS"}
REPORT_PREFIX = "report: "  # the last line `distill run` and every stage job print
EXIT_FAILED = 1


def entrypoint(job: str, config: str, overrides: list[str]) -> str:
    """The job's command line: ``python -m jobs.<job> CONFIG [--set k=v ...]``."""
    if job not in JOBS:
        raise ValueError(f"--job {job!r}: one of {', '.join(JOBS)}")
    args = ["python", "-m", f"jobs.{job}", config]
    for kv in overrides:
        args += ["--set", kv]
    return shlex.join(args)


def runtime_env(working_dir: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job's runtime_env: the project folder as working_dir (minus EXCLUDES), merged with
    `extra` (e.g. cluster/runtime_env.yaml: env_vars such as DISTILL_STORAGE_ROOT, pip)."""
    env: dict[str, Any] = dict(extra or {})
    if "working_dir" in env:
        raise ValueError("runtime_env: working_dir is the project folder; leave it out")
    for key in env.get("env_vars", {}):
        if set(key.upper().split("_")) & SECRET_WORDS:
            raise ValueError(
                f"runtime_env.env_vars.{key}: secrets do not travel in a runtime_env (the "
                f"cluster stores it and its dashboard shows it); give {key} to the nodes' "
                f"environment (a Kubernetes secret, the cluster launcher's env) instead"
            )
    env["working_dir"] = str(working_dir)
    env["excludes"] = EXCLUDES + list(env.get("excludes", []))
    return env


def load_runtime_env(path: Path | None) -> dict[str, Any] | None:
    """A runtime_env from a YAML or JSON file (cluster/runtime_env.yaml is one)."""
    if path is None:
        return None
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a runtime_env must be a mapping, got {type(data).__name__}")
    return data


def report_path(log_text: str) -> str | None:
    """Where the job said its report is (its last ``report: PATH`` line)."""
    found = [
        line.removeprefix(REPORT_PREFIX).strip()
        for line in log_text.splitlines()
        if line.startswith(REPORT_PREFIX)
    ]
    return found[-1] if found else None


def submit(
    address: str,
    job: str,
    config: str,
    overrides: list[str],
    *,
    working_dir: Path,
    extra_env: dict[str, Any] | None = None,
    follow: bool = True,
    echo: Callable[[str], None] = print,
) -> int:
    """Submit the job; with `follow`, stream its logs until it ends and return the exit code
    for this command (the driver's own, else 0 for SUCCEEDED and 1 otherwise)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    command = entrypoint(job, config, overrides)
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env(working_dir, extra_env))
    echo(f"submitted {job_id} to {address}: {command}")
    if not follow:
        return 0
    logged: list[str] = []

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            logged.append(chunk)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        echo(f"stopped following; {job_id} goes on (ray job stop {job_id} --address {address})")
        return 130
    info = client.get_job_info(job_id)
    report = report_path("".join(logged))
    echo(f"{job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    if report is not None:
        echo(f"{REPORT_PREFIX}{report}")
    if info.driver_exit_code is not None:
        return info.driver_exit_code
    return 0 if info.status == JobStatus.SUCCEEDED else EXIT_FAILED
