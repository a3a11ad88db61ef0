"""The run state under every stage: the run folder, each stage's output paths, the report.

A run is a folder, ``<run.output_dir>/<run_id>/``. When run.output_dir is a cloud URI the
folder is the driver's mirror of it (``ray_pipeline.storage.Mirror``): each report section
written uploads what changed, and opening the run again pulls it back. Stages find what an earlier stage wrote
here (``run.paths``, ``run.require(stage)``), never through that stage's module, so the
arrows between stages point one way: generate -> curate -> train -> sweep -> evaluate -> serve.

``report.json`` has one section per stage, written as soon as the stage ends; ``report.md`` is
re-rendered from it each time (``ray_pipeline.report``). A section present means the stage
finished: a later stage that needs it gets a message naming the command that produces it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ray_pipeline import storage
from ray_pipeline.config import DistillConfig, dump_config
from ray_pipeline.report import render_markdown

# The label every Ray node carries with its node id (label selectors pick nodes by it).
NODE_ID_LABEL = "ray.io/node-id"

STAGES = ("generate", "curate", "train", "sweep", "evaluate", "serve")


@dataclass(frozen=True)
class RunPaths:
    """Where each stage writes; the one place that names these paths."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    # generate: one Parquet row per input record, and the unreadable records aside
    @property
    def generate(self) -> Path:
        return self.root / "generate"

    @property
    def generated_rows(self) -> Path:
        return self.generate / "rows"

    @property
    def malformed(self) -> Path:
        return self.generate / "malformed.jsonl"

    # curate: the training set, every row left out with its reason, the manifest
    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    @property
    def dataset_train(self) -> Path:
        return self.dataset / "train"

    @property
    def dataset_rejected(self) -> Path:
        return self.dataset / "rejected"

    @property
    def dataset_manifest(self) -> Path:
        return self.dataset / "manifest.json"

    # train: Ray Train's run folder, holding the student checkpoint
    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def sweep(self) -> Path:
        return self.root / "sweep"

    @property
    def evaluate(self) -> Path:
        return self.root / "evaluate"

    @property
    def serve(self) -> Path:
        return self.root / "serve"

    @property
    def request_log(self) -> Path:
        """The request log's folder: time partitions of JSONL or Parquet files."""
        return self.serve / "requests"


@dataclass
class Run:
    """One run: its config, id and folder; the report sections of the stages done so far."""

    cfg: DistillConfig
    run_id: str
    dir: Path
    # The run folder's URI when run.output_dir is one (`dir` is then the driver's mirror).
    uri: str | None = None
    # The run's teacher quota actor (budget, rate limits, progress), shared by the stages of
    # this invocation; created by the first stage that calls the teacher.
    quota: Any = None

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.dir)

    @property
    def location(self) -> str:
        """Where the run lives: its URI, or its folder."""
        return self.uri or str(self.dir)

    @property
    def report_location(self) -> str:
        """Where the report is for the people who read it: under the run's URI, or the file."""
        return self.shared(self.paths.report_md)

    def shared(self, path: str | Path) -> str:
        """`path` (in the run folder) as every node reaches it: the path itself, or for a
        mirrored run the same place under the URI. Used for what workers and replicas on
        other nodes read (upload it first: ``push``)."""
        if self.uri is None:
            return str(path)
        rel = Path(path).absolute().relative_to(self.dir)
        return storage.join(self.uri, rel.as_posix())

    def shared_if_inside(self, path: str) -> str:
        """`path` as ``shared`` gives it when it is in the run folder, else unchanged (a
        checkpoint of another run, a URI)."""
        inside = not storage.is_uri(path) and Path(path).absolute().is_relative_to(self.dir)
        return self.shared(path) if inside else path

    def write_args(self) -> dict[str, Any]:
        """Ray Data's ``ray_remote_args`` for a write into the run folder: a mirrored run's
        folder is on the driver's disk only, so there the write tasks run on the driver's
        node (a label selector on Ray's node-id label; what `local://` paths did before Ray
        deprecated them). Its reads go to the URI (``shared``): pushed, readable anywhere."""
        if self.uri is None:
            return {}
        import ray

        if ray.util.client.ray.is_connected():
            raise StorageError(
                f"{self.uri}: a run on a URI keeps its folder on the driver's disk, and through "
                f"Ray Client (ray://) the driver is not on the cluster: submit the run as a "
                f"job instead (`distill submit`, `ray job submit`)"
            )
        # No CPU asked: the write is I/O, and a head node started with 0 CPUs (as KubeRay
        # heads often are) must still take it.
        return {
            "num_cpus": 0,
            "label_selector": {NODE_ID_LABEL: ray.get_runtime_context().get_node_id()},
        }

    def push(self) -> list[str]:
        """Upload what changed in a mirrored run's folder (nothing to do for a plain one)."""
        if self.uri is None:
            return []
        return storage.Mirror(self.dir, self.uri).push()

    def stage_dir(self, stage: str) -> Path:
        """The stage's output folder (created)."""
        path = getattr(self.paths, stage)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ------------------------------------------------------------------------- report
    def report(self) -> dict[str, Any]:
        return load_report(self.dir)

    def require(self, stage: str) -> dict[str, Any]:
        """An earlier stage's report section, or an error naming the command that makes it."""
        section = self.report().get(stage)
        if section is None:
            raise RuntimeError(
                f"{self.dir}: the {stage} stage has not finished in this run (no '{stage}' "
                f"section in report.json); run `distill {stage}` for it first, or "
                f"`distill run` for the whole loop"
            )
        return section

    def write_section(self, stage: str, section: dict[str, Any]) -> dict[str, Any]:
        """Set one stage's section; rewrite report.json and report.md; return the report."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        report = self.report()
        report["run_id"] = self.run_id
        report["run_dir"] = str(self.dir)  # what its paths start with (load_report)
        report[stage] = section
        _write_atomic(self.paths.report_json, json.dumps(report, indent=2, default=str))
        _write_atomic(self.paths.report_md, render_markdown(report))
        self.push()
        return report

    def student_checkpoint(self) -> tuple[str, str]:
        """(checkpoint, where it came from): the sweep's best trial when a sweep ran, else
        the train stage's."""
        report = self.report()
        best = (report.get("sweep") or {}).get("best") or {}
        if best.get("checkpoint"):
            return best["checkpoint"], "sweep.best"
        return self.require("train")["checkpoint"], "train"


def load_report(run_dir: str | Path) -> dict[str, Any]:
    """The run's report.json; when the folder it was written in is not here (a mirror pulled
    onto another machine, a folder moved), the paths in it are taken to `run_dir`."""
    path = RunPaths(Path(run_dir)).report_json
    if not path.exists():
        return {}
    text = path.read_text()
    written_in = json.loads(text).get("run_dir")
    here = str(Path(run_dir).absolute())
    if written_in and written_in != here and not Path(written_in).exists():
        text = text.replace(json.dumps(written_in)[1:-1], json.dumps(here)[1:-1])
    return json.loads(text)


def _write_atomic(path: Path, text: str) -> None:
    # A reader (or a crash) never sees half a report.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


STORAGE_ROOT_ENV = "DISTILL_STORAGE_ROOT"
# Set by Ray's job supervisor in the environment of a job's driver (`ray job submit`), whose
# working directory is Ray's temporary copy of the project: no place for outputs.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class StorageError(ValueError):
    """An output path that would be written where nobody finds it again."""


def resolve_storage(cfg: DistillConfig, environ: Mapping[str, str] | None = None) -> DistillConfig:
    """The config with relative run.output_dir, teacher.cache.dir and train.storage_path taken
    under the storage root (run.storage_root, else DISTILL_STORAGE_ROOT), made absolute.

    Without a root a relative path is relative to the working directory, except in a Ray job:
    there the working directory is Ray's temporary copy of the project, deleted with the
    cluster, so a relative path is refused with what to set instead."""
    environ = os.environ if environ is None else environ
    root = cfg.run.storage_root or environ.get(STORAGE_ROOT_ENV) or None
    if root is not None and storage.is_uri(root):
        try:
            root = storage.check_uri(root)
        except ValueError as e:
            raise StorageError(f"{STORAGE_ROOT_ENV}: {e}") from e
    elif root is not None and not Path(root).is_absolute():
        raise StorageError(f"{STORAGE_ROOT_ENV}={root}: must be an absolute path or a cloud URI")
    in_job = RAY_JOB_ENV in environ
    fields = {
        "run.output_dir": str(cfg.run.output_dir),
        "teacher.cache.dir": cfg.teacher.cache.dir if cfg.teacher.cache.enabled else None,
        "train.storage_path": cfg.train.storage_path,
    }
    resolved, problems = {}, []
    for field, value in fields.items():
        if value is None or "://" in value or Path(value).is_absolute():
            continue
        if root is not None:
            resolved[field] = (
                storage.join(root, value) if storage.is_uri(root) else str(Path(root) / value)
            )
        elif in_job:
            problems.append(
                f"{field}: {value!r} is a relative path, and this is a Ray job: it would be "
                f"written inside the job's temporary copy of the project ({Path.cwd()}), "
                f"which is deleted with the cluster. Set {field} to an absolute path every "
                f"node sees (--set {field}=/mnt/shared/{value}), or {STORAGE_ROOT_ENV} in the "
                f"job's environment (--runtime-env-json "
                f'\'{{"env_vars": {{"{STORAGE_ROOT_ENV}": "/mnt/shared"}}}}\') or run.storage_root'
            )
        else:
            resolved[field] = str(Path(value).absolute())
    if problems:
        raise StorageError("\n".join(problems))
    run = cfg.run.model_copy(
        update={"output_dir": resolved.get("run.output_dir", cfg.run.output_dir)}
    )
    cache = cfg.teacher.cache.model_copy(
        update={"dir": resolved.get("teacher.cache.dir", cfg.teacher.cache.dir)}
    )
    teacher = cfg.teacher.model_copy(update={"cache": cache})
    train = cfg.train.model_copy(
        update={"storage_path": resolved.get("train.storage_path", cfg.train.storage_path)}
    )
    return cfg.model_copy(update={"run": run, "teacher": teacher, "train": train})


def open_run(cfg: DistillConfig, run_id: str | None = None) -> Run:
    """Create (or re-open) <output_dir>/<run_id>/ and write the resolved config into it (its
    output paths resolved by ``resolve_storage``). A run on a URI is pulled into its mirror
    first (a resume, or a later stage on another machine)."""
    cfg = resolve_storage(cfg)
    run_id = run_id or cfg.run.run_id or f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if storage.is_uri(cfg.run.output_dir):
        uri = storage.join(cfg.run.output_dir, run_id)
        run = Run(cfg=cfg, run_id=run_id, dir=storage.mirror_dir(uri), uri=uri)
    else:
        run = Run(cfg=cfg, run_id=run_id, dir=(Path(cfg.run.output_dir) / run_id).absolute())
    run.dir.mkdir(parents=True, exist_ok=True)
    try:
        if run.uri is not None:
            storage.Mirror(run.dir, run.uri).pull()
        run.paths.config.write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False))
        run.push()  # the config first: a bucket nobody can write to fails here, before any work
    except OSError as e:
        if run.uri is None:
            raise
        raise StorageError(
            f"run.output_dir {cfg.run.output_dir}: cannot read or write {run.uri}: {e}. Check "
            f"that the bucket exists and this machine's credentials reach it (AWS_* or an "
            f"instance role for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://, "
            f"AWS_ENDPOINT_URL for an S3-compatible store)"
        ) from e
    return run


def latest_run_id(cfg: DistillConfig) -> str | None:
    """The config's fixed run.run_id when its folder exists, else the newest run folder of
    this config's run name, if any."""
    root = resolve_storage(cfg).run.output_dir
    if storage.is_uri(root):
        # A run on a URI is a folder its mirror pushed a manifest into.
        def pushed(run_id: str) -> bool:
            return storage.exists(storage.join(root, run_id, storage.MANIFEST))

        if cfg.run.run_id is not None:
            return cfg.run.run_id if pushed(cfg.run.run_id) else None
        # Run ids of one name end in their start time: the last in order is the newest.
        mine = [i for i in storage.list_dirs(root) if i.startswith(f"{cfg.run.name}-")]
        mine = [i for i in mine if pushed(i)]
        return mine[-1] if mine else None
    root = Path(root)
    if cfg.run.run_id is not None:
        return cfg.run.run_id if (root / cfg.run.run_id).is_dir() else None
    if not root.exists():
        return None
    runs = sorted(
        (p for p in root.glob(f"{cfg.run.name}-*") if p.is_dir()), key=lambda p: p.stat().st_mtime
    )
    return runs[-1].name if runs else None
