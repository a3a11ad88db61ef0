"""`distill serve build` writes a Serve config file for the e2e run; `distill serve` serves
until Ctrl-C (SIGINT to its whole process group, as a terminal sends it), then stops cleanly,
as a user runs it (a subprocess with its own embedded Ray). SIGTERM takes the same path
(``tests/unit/test_serve_parts.py``); both stop in about 4 s (measured, not asserted)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from ray_pipeline.run_state import load_report
from ray_pipeline.serving.args import AppArgs
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration


def test_serve_build_writes_a_deployable_serve_config(e2e_run, tmp_path):
    out = tmp_path / "serve.yaml"
    cmd = [
        sys.executable, "-m", "ray_pipeline.cli", "serve", "build", "configs/quickstart.yaml",
        "--set", f"run.output_dir={e2e_run.parent}", "--run-id", e2e_run.name, "-o", str(out),
        "--set", "serve.weights={student: 0.99, teacher: 0.01}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.startswith(f"# Serve config of run {e2e_run.name}") and "teacher-sim" in text
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    app = config.applications[0]
    assert app.import_path == "serve_apps.router:app"
    args = AppArgs.model_validate(app.args)
    assert args.students == {"student": load_report(e2e_run)["evaluate"]["checkpoint"]}
    assert args.teacher_base_url == "http://127.0.0.1:8001/v1"  # where the note starts it
    (control,) = app.deployments
    assert control.name == "RouterControl"
    assert control.user_config["weights"] == {"student": 0.99, "teacher": 0.01}


def test_distill_serve_stops_cleanly_on_ctrl_c(e2e_run, tmp_path):
    # A run folder of its own (the e2e report: its checkpoints), so the e2e run keeps its own.
    run_dir = tmp_path / "runs" / "served"
    run_dir.mkdir(parents=True)
    shutil.copy(e2e_run / "report.json", run_dir / "report.json")
    cmd = [
        sys.executable, "-m", "ray_pipeline.cli", "serve", "configs/quickstart.yaml",
        "--set", f"run.output_dir={tmp_path / 'runs'}", "--run-id", "served",
        "--set", "serve.port=0", "--set", "serve.smoke_requests=3",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "serving until interrupted" in line:
            break
    else:
        pytest.fail("distill serve exited before serving:\n" + "".join(lines[-50:]))
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends: every process of the job
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("distill serve did not stop within 60 s")
    rest = proc.stdout.read()
    stopped_s = time.monotonic() - started
    assert proc.returncode == 0, "".join(lines[-20:]) + rest[-4000:]
    serve = load_report(run_dir)["serve"]
    assert serve["stopped_by"] == "SIGINT"
    assert serve["requests"] == 3 and serve["errors"] == 0
    assert serve["request_log_files"] and serve["drift"]["inputs"] == 3
    print(f"distill serve stopped {stopped_s:.1f}s after Ctrl-C")  # reported, not asserted
