"""`distill` and the job scripts are one entry: the same command, the same behaviour."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
import typer.main

from ray_pipeline.cli import app

STAGES = ("generate", "curate", "train", "sweep", "evaluate", "serve")


def commands() -> set[str]:
    return set(typer.main.get_command(app).commands)


def test_every_job_script_is_the_cli_command_of_its_name(root):
    # Beside the stage jobs, jobs/jigsaw.py runs the playbook's case study (many runs of the
    # loop and their table): a job of its own, not a CLI command.
    names = {p.stem for p in (root / "jobs").glob("*.py")} - {"__init__", "jigsaw"}
    assert names == {*STAGES, "distill"}
    for name in names:
        tree = ast.parse((root / "jobs" / f"{name}.py").read_text())
        calls = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "job"
        ]
        assert len(calls) == 1, name
        command = calls[0].args[0].value
        assert command == ("run" if name == "distill" else name)
        assert command in commands()


@pytest.mark.parametrize(
    "entry", [["-m", "ray_pipeline.cli", "curate"], ["-m", "jobs.curate"]], ids=["cli", "job"]
)
def test_a_stage_without_an_earlier_run_is_refused_the_same_way(root, tmp_path, entry):
    cmd = [sys.executable, *entry, "configs/quickstart.yaml", "--set", f"run.output_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no earlier run of 'quickstart'" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # and no empty run folder was opened


@pytest.mark.parametrize("entry", [["-m", "ray_pipeline.cli", "train"], ["-m", "jobs.train"]])
def test_a_bad_config_is_refused_with_its_field_path(root, entry):
    cmd = [sys.executable, *entry, "configs/quickstart.yaml", "--set", "train.epochs=-1"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train.epochs: Input should be greater than 0" in proc.stderr


def test_run_until_a_stage_that_is_not_one_is_refused(root, tmp_path):
    cmd = [sys.executable, "-m", "ray_pipeline.cli", "run", "configs/quickstart.yaml"]
    cmd += ["--set", f"run.output_dir={tmp_path}", "--until", "curation"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--until 'curation' is not a stage" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_until_stops_after_that_stage(in_root):
    from ray_pipeline.config import load_config
    from ray_pipeline.pipeline import loop_stages

    cfg = load_config("configs/quickstart.yaml")
    assert loop_stages(cfg, until="curate") == ["generate", "curate"]
    assert loop_stages(cfg) == list(STAGES)
    cfg.sweep = None
    with pytest.raises(ValueError, match="until='sweep': this config runs the stages"):
        loop_stages(cfg, until="sweep")
