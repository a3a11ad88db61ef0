"""Where a run's outputs go (run_state.resolve_storage) and what `distill submit` sends
(ray_pipeline.submit): no Ray cluster needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ray_pipeline.config import ConfigError, load_config
from ray_pipeline.run_state import RAY_JOB_ENV, STORAGE_ROOT_ENV, StorageError, resolve_storage
from ray_pipeline.submit import EXCLUDES, entrypoint, report_path, runtime_env
from ray_pipeline.teacher.cache import ResponseCache

JOB = {RAY_JOB_ENV: "{}"}  # what Ray's job supervisor sets for a job's driver


def quickstart(*overrides: str):
    return load_config("configs/quickstart.yaml", list(overrides))


def test_relative_paths_go_under_the_storage_root(in_root):
    cfg = quickstart("teacher.cache.dir=cache/t", "train.storage_path=ckpt")
    out = resolve_storage(cfg, {STORAGE_ROOT_ENV: "/mnt/shared", **JOB})
    assert out.run.output_dir == "/mnt/shared/runs"
    assert out.teacher.cache.dir == "/mnt/shared/cache/t"
    assert out.train.storage_path == "/mnt/shared/ckpt"
    # the config's own root wins over the environment's
    cfg = quickstart("run.storage_root=/data")
    assert resolve_storage(cfg, {STORAGE_ROOT_ENV: "/mnt/shared"}).run.output_dir == "/data/runs"


def test_absolute_paths_and_uris_are_kept(in_root):
    cfg = quickstart(
        "run.output_dir=/abs/runs", "teacher.cache.dir=s3://b/cache", "train.storage_path=gs://b/c"
    )
    out = resolve_storage(cfg, JOB)
    assert (out.run.output_dir, out.teacher.cache.dir, out.train.storage_path) == (
        "/abs/runs",
        "s3://b/cache",
        "gs://b/c",
    )


def test_outside_a_job_relative_means_the_working_directory(in_root):
    out = resolve_storage(quickstart(), {})
    assert out.run.output_dir == str(in_root / "runs")
    assert out.train.storage_path is None and out.teacher.cache.dir is None


def test_a_job_without_a_root_refuses_relative_paths_saying_what_to_set(in_root):
    with pytest.raises(StorageError) as e:
        resolve_storage(quickstart("train.storage_path=ckpt"), {**JOB, STORAGE_ROOT_ENV: ""})
    message = str(e.value)
    assert "run.output_dir: 'runs' is a relative path, and this is a Ray job" in message
    assert "train.storage_path: 'ckpt' is a relative path" in message
    assert "--set run.output_dir=/mnt/shared/runs" in message and STORAGE_ROOT_ENV in message


def test_a_relative_root_is_refused(in_root):
    with pytest.raises(StorageError, match="must be an absolute path or a cloud URI"):
        resolve_storage(quickstart(), {STORAGE_ROOT_ENV: "shared"})
    with pytest.raises(
        ConfigError, match="run.storage_root: must be an absolute path or a cloud URI, got .shared."
    ):
        quickstart("run.storage_root=shared")


def test_the_run_folder_may_be_a_uri_and_the_root_too(in_root):
    cfg = quickstart("run.output_dir=s3://bucket/runs/")
    assert resolve_storage(cfg, JOB).run.output_dir == "s3://bucket/runs"
    # a URI root: relative paths go under it, in a job as outside one
    out = resolve_storage(
        quickstart("teacher.cache.dir=cache/t"), {STORAGE_ROOT_ENV: "gs://b/d", **JOB}
    )
    assert (out.run.output_dir, out.teacher.cache.dir) == ("gs://b/d/runs", "gs://b/d/cache/t")
    with pytest.raises(ConfigError, match=r"run.output_dir: .*'ftp://h/x': not a storage URI"):
        quickstart("run.output_dir=ftp://h/x")
    with pytest.raises(StorageError, match="DISTILL_STORAGE_ROOT: 'http://h/x': not a storage"):
        resolve_storage(quickstart(), {STORAGE_ROOT_ENV: "http://h/x"})


@pytest.mark.parametrize("entry", [["-m", "jobs.distill"], ["-m", "ray_pipeline.cli", "train"]])
def test_a_job_entry_refuses_a_relative_output_dir_before_any_work(root, tmp_path, entry):
    """What `ray job submit ... -- python -m jobs.distill configs/quickstart.yaml` does when
    nothing says where outputs go: exit 2 with the message, nothing written."""
    cmd = [sys.executable, *entry, str(root / "configs/quickstart.yaml")]
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(root), **JOB}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "'runs' is a relative path, and this is a Ray job" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_submit_entrypoint_and_runtime_env(tmp_path):
    assert entrypoint("train", "configs/q.yaml", ["train.epochs=1", "a.b=x y"]) == (
        "python -m jobs.train configs/q.yaml --set train.epochs=1 --set 'a.b=x y'"
    )
    with pytest.raises(ValueError, match="--job 'trian': one of distill, generate"):
        entrypoint("trian", "c.yaml", [])
    env = runtime_env(tmp_path, {"env_vars": {"DISTILL_STORAGE_ROOT": "/s"}, "excludes": ["x/"]})
    assert env["working_dir"] == str(tmp_path) and env["env_vars"] == {"DISTILL_STORAGE_ROOT": "/s"}
    assert env["excludes"] == [*EXCLUDES, "x/"] and {".venv/", "runs/"} <= set(EXCLUDES)
    for secret in ("OPENAI_API_KEY", "RAY_AUTH_TOKEN", "DB_PASSWORD"):
        with pytest.raises(ValueError, match=f"env_vars.{secret}: secrets do not travel"):
            runtime_env(tmp_path, {"env_vars": {secret: "x"}})
    with pytest.raises(ValueError, match="working_dir is the project folder"):
        runtime_env(tmp_path, {"working_dir": "s3://x.zip"})


def test_report_path_is_the_last_report_line():
    log = "x\nreport: /a/report.md\nmore\nreport: /b/report.md\n  report: no\n"
    assert report_path(log) == "/b/report.md"
    assert report_path("nothing here") is None


def test_cache_on_a_uri_reads_what_a_folder_cache_wrote(tmp_path):
    """The cache through pyarrow (here file://, as s3:// or gs://) and on a folder are the
    same store."""
    key = "ab" * 32
    remote = ResponseCache(f"file://{tmp_path}/cache")
    assert remote.get(key) is None
    remote.put(key, {"text": "1"})
    assert remote.get(key) == {"text": "1"} and len(remote) == 1
    local = ResponseCache(tmp_path / "cache")
    assert local.get(key) == {"text": "1"} and len(local) == 1
    local.put("cd" * 32, {"text": "0"})
    assert remote.get("cd" * 32) == {"text": "0"} and len(remote) == 2
