"""Student models: the tiny random-init Llama, pretrained hub models, and LoRA on top.

Two kinds, one set of functions: a causal LM (``AutoModelForCausalLM``: writes the answer)
and a sequence classifier (``AutoModelForSequenceClassification``: one class per task label,
its head trained fully beside LoRA adapters)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray_pipeline.config import LoraSection, TinyModelSection, TrainSection

if TYPE_CHECKING:
    import torch

TINY = "tiny"
CAUSAL_LM, CLASSIFIER = "causal_lm", "classifier"


def label_maps(labels: list[str]) -> dict[str, Any]:
    """The classifier config's class names: class i is task label labels[i]."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def build_tiny_model(
    tokenizer: Any,
    tiny: TinyModelSection,
    seed: int,
    kind: str = CAUSAL_LM,
    labels: list[str] | None = None,
) -> Any:
    """A small Llama sized to the tokenizer, its random weights fixed by `seed`: a causal LM,
    or (kind 'classifier') a sequence classifier over `labels`, which reads the last non-pad
    token. Input and output embeddings are not tied, so each can be trained on its own."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_heads,
        intermediate_size=tiny.intermediate_size,
        max_position_embeddings=tiny.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **(label_maps(labels) if kind == CLASSIFIER else {}),
    )
    # fork_rng: seeding must not change the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == CLASSIFIER:
            return LlamaForSequenceClassification(config)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def weights_dtype(train: TrainSection) -> torch.dtype:
    """dtype to load pretrained weights in: bf16 halves memory on GPU when training in bf16;
    fp16 training keeps fp32 weights (DeepSpeed / autocast make the half copies)."""
    import torch

    return torch.bfloat16 if train.use_gpu and train.precision == "bf16" else torch.float32


def quantization(train: TrainSection) -> Any:
    """The QLoRA quantization config (4-bit NF4 weights, bf16 compute, double quantization:
    the QLoRA paper's settings) when lora.load_in_4bit, else None. bitsandbytes quantizes on
    CUDA only: without it or a GPU this is a clear error, not a silent fp32 run."""
    if not train.lora.load_in_4bit:
        return None
    import importlib.util

    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(
            "train.lora.load_in_4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes"
        )
    if not torch.cuda.is_available():
        raise RuntimeError("train.lora.load_in_4bit (QLoRA) needs a CUDA GPU on every worker")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def load_pretrained(
    name_or_path: str,
    dtype: torch.dtype | None = None,
    kind: str = CAUSAL_LM,
    labels: list[str] | None = None,
    pad_id: int | None = None,
    quantization_config: Any = None,
) -> Any:
    """A student from the hub or a local directory (the path users take with real models): a
    causal LM, or a sequence classifier over `labels` (a new head, or the saved one when the
    directory is a classifier already). Under an active DeepSpeed ZeRO-3 config
    (HfDeepSpeedConfig) transformers loads it partitioned across ranks instead of whole."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    extra: dict[str, Any] = {}
    if quantization_config is not None:
        import torch

        # 4-bit weights are quantized as they load, onto this worker's GPU.
        extra = {
            "quantization_config": quantization_config,
            "device_map": {"": torch.cuda.current_device()},
        }
    if kind != CLASSIFIER:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **extra)
    model = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, dtype=dtype, **label_maps(labels or []), **extra
    )
    if model.config.pad_token_id is None and pad_id is not None:
        # Decoder classifiers read the last non-pad token: they must know the pad id.
        model.config.pad_token_id = pad_id
    return model


def apply_lora(model: Any, lora: LoraSection, kind: str = CAUSAL_LM) -> Any:
    """Wrap `model` with LoRA adapters; only adapters and `modules_to_save` stay trainable
    (for a classifier PEFT also keeps its new head, ``classifier``/``score``, trainable)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="SEQ_CLS" if kind == CLASSIFIER else "CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=list(lora.modules_to_save) or None,
    )
    return get_peft_model(model, config)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; under ZeRO-3 uses the full (unpartitioned) sizes."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
