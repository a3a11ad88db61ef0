from __future__ import annotations

import pytest
import yaml

from ray_pipeline.config import ConfigError, load_config


def _base() -> dict:
    return {
        "task": {"prompt": {"template": "Classify: {input}"}, "labels": ["0", "1"]},
        "teacher": {"simulator": {"enabled": True, "rule": "quickstart"}},
        "data": {"logs": [{"path": "x.jsonl"}]},
    }


def test_every_shipped_config_loads(root, in_root):
    configs = sorted((root / "configs").glob("*.yaml"))
    assert configs, "configs/ has no YAML files"
    for path in configs:
        cfg = load_config(path)
        assert cfg.task.labels if cfg.task.kind == "label" else cfg.task.output_schema
        first_lines = path.read_text().splitlines()[:12]
        assert any(
            path.name in line and ("distill" in line or "jobs." in line) for line in first_lines
        ), f"{path.name}: the header must show the command that runs it"


def test_all_problems_reported_with_field_paths():
    data = _base()
    data["teacher"]["max_attempts"] = -5
    data["train"] = {"epochs": "many", "lora": {"r": 0}, "bogus": 1}
    data["serve"] = {"weights": {"student": -1, "teacher": 0}}
    with pytest.raises(ConfigError) as exc:
        load_config(data=data)
    problems = exc.value.problems
    joined = "\n".join(problems)
    assert "teacher.max_attempts: Input should be greater than 0, got -5" in joined
    assert "train.epochs:" in joined and "'many'" in joined
    assert "train.lora.r:" in joined
    assert "train.bogus: Extra inputs are not permitted" in joined
    assert "serve.weights:" in joined
    assert len(problems) == 5


def test_missing_required_sections_named():
    with pytest.raises(ConfigError) as exc:
        load_config(data={})
    assert {p.split(":")[0] for p in exc.value.problems} == {"task", "teacher", "data"}


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        data=_base(),
        overrides=["train.epochs=2", "train.lora.r=4", "serve.enabled=false", "run.name=x"],
    )
    assert cfg.train.epochs == 2 and cfg.train.lora.r == 4
    assert cfg.serve.enabled is False and cfg.run.name == "x"


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(data=_base(), overrides=["train.epochs"])


def test_teacher_needs_endpoint_or_simulator():
    data = _base()
    data["teacher"] = {"model": "gpt-4o"}
    with pytest.raises(ConfigError, match="teacher: base_url is required unless simulator.enabled"):
        load_config(data=data)


def test_top_logprobs_is_off_or_a_count_of_alternatives():
    cfg = load_config(data=_base())
    assert cfg.teacher.top_logprobs is None and cfg.teacher.logprob_params() == {}
    cfg = load_config(data=_base(), overrides=["teacher.top_logprobs=5"])
    assert cfg.teacher.logprob_params() == {"logprobs": True, "top_logprobs": 5}
    for value, problem in (
        ("0", "teacher.top_logprobs: Input should be greater than or equal to 1, got 0"),
        ("21", "teacher.top_logprobs: Input should be less than or equal to 20, got 21"),
        ("true", "teacher.top_logprobs: give the number of alternatives per token (1 to 20)"),
        ("some", "teacher.top_logprobs: Input should be a valid integer"),
    ):
        with pytest.raises(ConfigError) as exc:
            load_config(data=_base(), overrides=[f"teacher.top_logprobs={value}"])
        assert len(exc.value.problems) == 1 and exc.value.problems[0].startswith(problem)


def test_prompt_needs_placeholder_and_one_source():
    data = _base()
    data["task"]["prompt"] = {"template": "no slot here"}
    with pytest.raises(ConfigError, match="task.prompt: template does not contain the placeholder"):
        load_config(data=data)
    data["task"]["prompt"] = {"template": "x {input}", "file": "p.txt"}
    with pytest.raises(ConfigError, match="exactly one of 'template' or 'file'"):
        load_config(data=data)


def test_integer_labels_become_strings():
    data = _base()
    data["task"]["labels"] = [0, 1]
    assert load_config(data=data).task.labels == ["0", "1"]


def test_bad_regex_and_fractions_rejected():
    data = _base()
    data["curate"] = {"rules": {"deny_patterns": ["(unclosed"]}}
    data["sweep"] = {"fractions": [0.0, 1.5]}
    with pytest.raises(ConfigError) as exc:
        load_config(data=data)
    joined = "\n".join(exc.value.problems)
    assert "curate.rules.deny_patterns: pattern '(unclosed' does not compile" in joined
    assert "sweep.fractions: fractions must be non-empty, distinct and in (0, 1]" in joined


def test_gpu_precision_needs_gpu():
    data = _base()
    data["train"] = {"precision": "bf16"}
    with pytest.raises(ConfigError, match="precision 'bf16' needs use_gpu: true"):
        load_config(data=data)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_overrides_reach_into_lists():
    cfg = load_config(data=_base(), overrides=["data.logs.0.limit=7", "data.logs.0.path=y.csv"])
    assert cfg.data.logs[0].limit == 7 and str(cfg.data.logs[0].path) == "y.csv"
    with pytest.raises(ConfigError, match="data.logs is a list of 1; '3' is not an index"):
        load_config(data=_base(), overrides=["data.logs.3.limit=7"])
    with pytest.raises(ConfigError, match="run.name is not a section or a list"):
        load_config(data=_base(), overrides=["run.name=x", "run.name.y=1"])


def test_learning_rate_scales_with_the_effective_batch():
    from ray_pipeline.config import TrainSection

    base = {"learning_rate": 1e-4, "batch_size": 16, "gradient_accumulation_steps": 2}
    train = TrainSection.model_validate({**base, "num_workers": 4, "lr_reference_batch": 32})
    assert train.effective_batch == 128 and train.peak_learning_rate == 1e-4  # none: as given
    linear = TrainSection.model_validate(
        {**base, "num_workers": 4, "lr_reference_batch": 32, "lr_scaling": "linear"}
    )
    assert linear.peak_learning_rate == pytest.approx(4e-4)
    root = TrainSection.model_validate(
        {**base, "num_workers": 4, "lr_reference_batch": 32, "lr_scaling": "sqrt"}
    )
    assert root.peak_learning_rate == pytest.approx(2e-4)


@pytest.mark.parametrize(
    ("train", "problem"),
    [
        ({"packing": True, "student": {"kind": "classifier"}}, "packing is for causal_lm"),
        ({"packing": True, "distill": {"weight": 0.5}}, "packing does not carry"),
        ({"lora": {"load_in_4bit": True}}, "needs method: lora and use_gpu"),
        (
            {"lora": {"load_in_4bit": True}, "use_gpu": True, "deepspeed": {"zero_stage": 3}},
            "cannot be sharded by ZeRO-3",
        ),
        ({"export_merged": True, "method": "full"}, "export_merged is for method: lora"),
        ({"distill": {"weight": 1.5}}, "less than or equal to 1"),
        ({"placement_strategy": "ANYWHERE"}, "PACK"),
        ({"max_failures": -2}, "greater than or equal to -1"),
    ],
)
def test_training_settings_that_cannot_work_are_named(train, problem):
    from ray_pipeline.config import TrainSection

    with pytest.raises(ValueError, match=problem):
        TrainSection.model_validate(train)


def test_qlora_without_bitsandbytes_or_a_gpu_is_a_clear_error():
    import importlib.util

    from ray_pipeline.config import TrainSection
    from ray_pipeline.train.model import quantization

    train = TrainSection.model_validate(
        {"use_gpu": True, "method": "lora", "lora": {"load_in_4bit": True}}
    )
    missing = "bitsandbytes" if importlib.util.find_spec("bitsandbytes") is None else "CUDA GPU"
    with pytest.raises(RuntimeError, match=missing):
        quantization(train)
    assert quantization(TrainSection()) is None
