"""Run folders, checkpoints and the request log on a cloud URI (ray_pipeline.storage), against
a real S3 API on 127.0.0.1 (moto's server, the `s3` fixture): no Ray cluster needed."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from ray_pipeline import storage
from ray_pipeline.config import load_config
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.run_state import latest_run_id, load_report, open_run
from ray_pipeline.serving.request_log import RequestLogFiles, log_files
from ray_pipeline.serving.stage import served_inputs

BUCKET = "s3://distill-test"


def uri(name: str) -> str:
    return f"{BUCKET}/{name}-{time.time_ns()}"


def files_at(where: str) -> dict[str, bytes]:
    return {f[len(where) + 1 :]: storage.read_bytes(f) for f in storage.list_files(where)}


def test_push_uploads_what_changed_and_pull_brings_back_only_pushed_files(s3, tmp_path):
    remote = uri("mirror")
    local = tmp_path / "mirror"
    (local / "a").mkdir(parents=True)
    (local / "a" / "x.json").write_text("1")
    (local / "y.txt").write_text("y")
    mirror = storage.Mirror(local, remote)
    assert sorted(mirror.push()) == ["a/x.json", "y.txt"]
    assert mirror.push() == []  # nothing changed: nothing sent
    (local / "y.txt").write_text("y2")
    assert mirror.push() == ["y.txt"]
    # something Ray wrote at the URI itself (a checkpoint) is not the mirror's to pull
    storage.write_bytes(f"{remote}/train/checkpoint_000000/model.bin", b"w")
    fresh = storage.Mirror(tmp_path / "elsewhere", remote)
    assert sorted(fresh.pull()) == ["a/x.json", "y.txt"]
    assert (tmp_path / "elsewhere" / "y.txt").read_text() == "y2"
    assert not (tmp_path / "elsewhere" / "train").exists()
    assert fresh.pull() == [] and fresh.push() == []  # in step both ways
    # a file the manifest lists but a later writer removed there: skipped, not an error
    (local / "z.txt").write_text("z")
    mirror.push()
    storage.filesystem(remote)[0].delete_file(storage.filesystem(f"{remote}/z.txt")[1])
    assert sorted(storage.Mirror(tmp_path / "third", remote).pull()) == ["a/x.json", "y.txt"]
    assert storage.Mirror(tmp_path / "none", uri("empty")).pull() == []


def test_local_copy_is_made_once_per_version_of_the_folder(s3, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    remote = uri("ckpt")
    storage.write_bytes(f"{remote}/meta.json", b'{"v": 1}')
    storage.write_bytes(f"{remote}/sub/w.bin", b"123")
    first = storage.local_copy(remote)
    assert json.loads(Path(first, "meta.json").read_text()) == {"v": 1}
    assert Path(first, "sub", "w.bin").read_bytes() == b"123"
    assert storage.local_copy(remote) == first  # unchanged: the same copy, not fetched again
    time.sleep(0.01)
    storage.write_bytes(f"{remote}/meta.json", b'{"v": 2, "threshold": 0.5}')
    second = storage.local_copy(remote)
    assert second != first and json.loads(Path(second, "meta.json").read_text())["v"] == 2
    assert storage.local_copy(str(tmp_path)) == str(tmp_path)  # a folder is itself
    with pytest.raises(FileNotFoundError, match="no such folder"):
        storage.local_copy(uri("missing"))


def test_processes_asking_for_one_copy_at_once_get_one_copy(s3, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    remote = uri("shared-ckpt")
    for i in range(20):
        storage.write_bytes(f"{remote}/part-{i}.bin", bytes(1000 * i))
    with ThreadPoolExecutor(6) as pool:
        got = set(pool.map(lambda _: storage.local_copy(remote), range(6)))
    assert len(got) == 1
    copies = [p.name for p in (tmp_path / "cache" / "copies").iterdir()]
    assert [c for c in copies if not c.endswith(".lock")] == [Path(got.pop()).name]


def test_a_run_on_a_uri_is_mirrored_pushed_and_found_again(s3, tmp_path, monkeypatch, in_root):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "driver1"))
    runs = uri("runs")
    cfg = load_config("configs/quickstart.yaml", [f"run.output_dir={runs}", "run.name=qs"])
    run = open_run(cfg, "qs-20261201-000001")
    assert run.uri == f"{runs}/qs-20261201-000001"
    assert run.dir == tmp_path / "driver1" / "runs" / "s3" / runs.removeprefix("s3://") / run.run_id
    assert run.report_location == f"{run.uri}/report.md"
    assert run.shared(run.paths.dataset_train) == f"{run.uri}/dataset/train"
    assert run.shared_if_inside("/elsewhere/ckpt") == "/elsewhere/ckpt"
    (run.stage_dir("generate") / "rows.parquet").write_bytes(b"PAR1")
    section = {
        "rows": 3, "status": {"ok": 3}, "teacher_calls": 3, "recorded_responses": 0,
        "prompt_tokens": 30, "completion_tokens": 3, "seconds": 1.0,
    }  # fmt: skip
    run.write_section("generate", section)
    at_uri = files_at(run.uri)
    assert {"config.yaml", "report.json", "report.md", "generate/rows.parquet"} <= set(at_uri)
    assert json.loads(at_uri["report.json"])["generate"] == section
    # another machine (another cache folder): the newest run of the name, pulled whole
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "driver2"))
    open_run(cfg, "qs-20261201-000000")  # an older run id beside it
    assert latest_run_id(cfg) == "qs-20261201-000001"
    again = open_run(cfg, "qs-20261201-000001")
    assert again.dir.is_relative_to(tmp_path / "driver2")
    assert load_report(again.dir)["generate"] == section
    # paths the report holds are taken to where the run is now, when it was written elsewhere
    section["plot"] = str(run.dir / "generate" / "x.png")
    run.write_section("generate", section)
    again = open_run(cfg, "qs-20261201-000001")
    assert load_report(again.dir)["generate"]["plot"] == str(run.dir / "generate" / "x.png")
    shutil.rmtree(tmp_path / "driver1")  # the first machine is gone
    assert load_report(again.dir)["generate"]["plot"] == str(again.dir / "generate" / "x.png")
    assert (again.paths.generate / "rows.parquet").read_bytes() == b"PAR1"
    fixed = load_config("configs/quickstart.yaml", [f"run.output_dir={runs}", "run.run_id=nope"])
    assert latest_run_id(fixed) is None


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_request_log_on_a_uri_writes_one_object_per_flush(s3, fmt):
    where = uri("requests")
    files = RequestLogFiles(where, fmt, "hour", "replica1")

    def record(i: int, status: int = 200) -> dict:
        text = f"Comment: text {i}\nLabel:"
        return {
            "id": str(i), "ts": 1_764_590_000.0 + i, "endpoint": "chat", "mode": "split",
            "request": {"model": "student", "messages": [{"role": "user", "content": text}]},
            "response": None, "served_by": "student", "status": status, "error": None,
        }  # fmt: skip

    first = files.write([record(1), record(2, status=400)])
    second = files.write([record(3)])
    assert len(first) == 2 and len(second) == 1 and all(storage.is_uri(f) for f in first)
    found = log_files(where)
    assert found == sorted(f for f in [*first, *second] if "/rejected-" not in f)
    assert [f.rsplit("/", 1)[1] for f in found] == [
        f"requests-replica1-000001.{fmt}",
        f"requests-replica1-000003.{fmt}",
    ]
    assert [f.rsplit("/", 1)[1] for f in log_files(where, "rejected")] == [
        f"rejected-replica1-000002.{fmt}"
    ]
    prompt = Prompt(template="Comment: {input}\nLabel:", placeholder="{input}")
    assert served_inputs(found, prompt) == ["text 3", "text 1"]  # newest first


def test_a_uri_with_a_scheme_pyarrow_does_not_read_is_refused():
    with pytest.raises(ValueError, match="'http://h/x': not a storage URI this project reads"):
        storage.check_uri("http://h/x")
    with pytest.raises(ValueError, match="without options after '.'.*AWS_ENDPOINT_URL"):
        storage.check_uri("s3://b/p?endpoint_override=h:9000")
    assert storage.check_uri("gs://b/p/") == "gs://b/p"
    assert storage.as_uri_like("bkt/a/checkpoint_1", "s3://bkt/a") == "s3://bkt/a/checkpoint_1"
    assert storage.as_uri_like("/tmp/a/c", "file:///tmp/a") == "file:///tmp/a/c"
    assert storage.as_uri_like("/tmp/a/c", "/tmp/a") == "/tmp/a/c"


def test_a_log_on_a_uri_reads_as_the_same_file_on_disk(s3, tmp_path, in_root):
    """The next round's data.logs may name the request log objects of a run on a bucket."""
    from ray_pipeline.config import LogSource
    from ray_pipeline.data.manifest import source_entry
    from ray_pipeline.data.sources import log_blocks

    cfg = load_config("configs/quickstart.yaml")
    local = in_root / "configs/data/quickstart/logs.jsonl"
    remote = f"{uri('logs')}/logs.jsonl"
    storage.write_bytes(remote, local.read_bytes())

    def rows(path: str) -> list[dict]:
        blocks = log_blocks(LogSource(path=path), cfg.task, block_rows=16)
        return [
            {k: v for k, v in r.items() if k not in ("id", "source")}
            for b in blocks
            for r in b.to_pylist()
        ]

    assert rows(remote) == rows(str(local)) and len(rows(remote)) > 100
    on_disk, in_bucket = source_entry(local), source_entry(remote)
    assert (in_bucket["bytes"], in_bucket["sha256"]) == (on_disk["bytes"], on_disk["sha256"])
    with pytest.raises(FileNotFoundError, match="is not a file"):
        storage.file_size(f"{remote}.missing")
