"""The DeepSpeed config builder, for every ZeRO stage x offload x precision x batch shape."""

from __future__ import annotations

import itertools

import pytest

from ray_pipeline.config import ConfigError, TrainSection, load_config
from ray_pipeline.train.deepspeed_config import build_deepspeed_config


def _train(**kw) -> TrainSection:
    return TrainSection.model_validate(kw)


def _valid_combinations():
    for stage, offload_opt, offload_params, precision, gpu in itertools.product(
        [0, 1, 2, 3], [False, True], [False, True], ["fp32", "bf16", "fp16"], [False, True]
    ):
        if offload_opt and stage == 0 or offload_params and stage != 3:
            continue
        if (offload_opt or offload_params or precision != "fp32") and not gpu:
            continue
        yield stage, offload_opt, offload_params, precision, gpu


@pytest.mark.parametrize(
    ("stage", "offload_opt", "offload_params", "precision", "gpu"), list(_valid_combinations())
)
def test_every_valid_combination(stage, offload_opt, offload_params, precision, gpu):
    train = _train(
        use_gpu=gpu,
        precision=precision,
        batch_size=4,
        gradient_accumulation_steps=3,
        max_grad_norm=0.5,
        learning_rate=2e-4,
        deepspeed={
            "zero_stage": stage,
            "offload_optimizer": offload_opt,
            "offload_params": offload_params,
        },
    )
    cfg = build_deepspeed_config(train, world_size=8)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 4 * 3 * 8  # DeepSpeed checks this identity
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_allow_untested_optimizer"] is True
    assert ("bf16" in cfg) == (precision == "bf16") and ("fp16" in cfg) == (precision == "fp16")
    if precision == "fp16":
        assert cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert ("offload_optimizer" in zero) == offload_opt
    assert ("offload_param" in zero) == offload_params
    # Offloaded optimizer state needs DeepSpeed's own (CPU) Adam: named in the config, with
    # the trainer's settings; otherwise the loop's torch AdamW is used and none is named.
    if offload_opt:
        assert zero["offload_optimizer"]["device"] == "cpu"
        assert cfg["optimizer"] == {
            "type": "AdamW",
            "params": {"lr": 2e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8},
        }
    else:
        assert "optimizer" not in cfg
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)
    assert zero.get("overlap_comm", False) == (gpu and stage >= 2)


def test_defaults_are_cpu_zero2_fp32():
    cfg = build_deepspeed_config(TrainSection(), world_size=2)
    assert cfg["zero_optimization"] == {
        "stage": 2,
        "overlap_comm": False,
        "contiguous_gradients": True,
    }
    assert cfg["train_batch_size"] == 16 * 2
    assert "bf16" not in cfg and "fp16" not in cfg and "optimizer" not in cfg


@pytest.mark.parametrize(
    ("train", "problem"),
    [
        ({"precision": "bf16"}, "precision 'bf16' needs use_gpu: true"),
        (
            {"deepspeed": {"zero_stage": 0, "offload_optimizer": True}},
            "offload_optimizer needs zero_stage >= 1",
        ),
        (
            {"use_gpu": True, "deepspeed": {"zero_stage": 2, "offload_params": True}},
            "offload_params needs zero_stage 3",
        ),
        (
            {"deepspeed": {"zero_stage": 3, "offload_params": True}},
            "deepspeed offload needs deepspeed.enabled and use_gpu",
        ),
        (
            {
                "use_gpu": True,
                "deepspeed": {"enabled": False, "zero_stage": 2, "offload_optimizer": True},
            },
            "deepspeed offload needs deepspeed.enabled",
        ),
        ({"max_seq_len": 1024}, "exceeds the tiny student's max_position_embeddings (512)"),
        ({"student": {"model": "tiny", "tokenizer": "gpt2"}}, "leave it empty"),
    ],
)
def test_impossible_settings_are_config_errors(train, problem):
    data = {
        "task": {"prompt": {"template": "Classify: {input}"}, "labels": ["0", "1"]},
        "teacher": {"simulator": {"enabled": True, "rule": "quickstart"}},
        "data": {"logs": [{"path": "x.jsonl"}]},
        "train": train,
    }
    with pytest.raises(ConfigError) as exc:
        load_config(data=data)
    assert problem in "\n".join(exc.value.problems)


def test_gpu_paths_reachable_by_config_alone():
    """Multi-GPU ZeRO-3 with offload and bf16 on 4 nodes x 8 GPUs is only configuration."""
    train = _train(
        use_gpu=True,
        precision="bf16",
        num_workers=32,
        deepspeed={"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
    )
    cfg = build_deepspeed_config(train, world_size=train.num_workers)
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert cfg["train_batch_size"] == 16 * 32


@pytest.mark.parametrize(
    ("stage", "offload_opt", "offload_params", "precision", "gpu"), list(_valid_combinations())
)
def test_deepspeed_accepts_every_combination(stage, offload_opt, offload_params, precision, gpu):
    """DeepSpeed's own config parser (strict about unknown keys and the batch-size identity)
    reads what we build the way we mean it."""
    from deepspeed.runtime.config import DeepSpeedConfig

    train = _train(
        use_gpu=gpu,
        precision=precision,
        deepspeed={
            "zero_stage": stage,
            "offload_optimizer": offload_opt,
            "offload_params": offload_params,
        },
    )
    parsed = DeepSpeedConfig(build_deepspeed_config(train, world_size=1))
    assert parsed.zero_optimization_stage == stage
    assert parsed.train_batch_size == train.batch_size
    assert parsed.bfloat16_config.enabled == (precision == "bf16")
    assert parsed.float16_config.enabled == (precision == "fp16")
    assert (parsed.zero_config.offload_optimizer is not None) == offload_opt
    assert (parsed.zero_config.offload_param is not None) == offload_params


def test_pretrained_weights_load_in_bf16_only_for_gpu_bf16_training():
    import torch

    from ray_pipeline.train.model import weights_dtype

    assert weights_dtype(_train(use_gpu=True, precision="bf16")) == torch.bfloat16
    assert weights_dtype(_train(use_gpu=True, precision="fp16")) == torch.float32
    assert weights_dtype(_train()) == torch.float32


def test_a_user_json_is_laid_over_the_generated_config(tmp_path):
    override = tmp_path / "ds.json"
    override.write_text(
        '{"zero_optimization": {"reduce_bucket_size": 5e7, "overlap_comm": true},'
        ' "gradient_clipping": 0.3, "activation_checkpointing": {"partition_activations": true}}'
    )
    train = _train(deepspeed={"zero_stage": 2, "config_file": str(override)})
    config = build_deepspeed_config(train, world_size=2)
    zero = config["zero_optimization"]
    # Nested objects merge (ours kept, theirs added or replaced); top-level keys replace.
    assert zero["stage"] == 2 and zero["contiguous_gradients"] is True
    assert zero["reduce_bucket_size"] == 5e7 and zero["overlap_comm"] is True
    assert config["gradient_clipping"] == 0.3
    assert config["activation_checkpointing"] == {"partition_activations": True}
    assert config["train_micro_batch_size_per_gpu"] == train.batch_size


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "does not exist"), ("{not json", "is not JSON"), ("[1, 2]", "must hold a JSON object")],
)
def test_a_bad_user_json_is_named(tmp_path, content, problem):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=problem):
        _train(deepspeed={"config_file": str(path)})
