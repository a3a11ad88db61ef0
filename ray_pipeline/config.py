"""One typed configuration for a whole distillation run.

Loaded from YAML, overridden with ``--set a.b=c``, validated before any work starts. Every
problem is reported at once, each with the path of the field it concerns, e.g.
``teacher.max_attempts: Input should be greater than 0, got -5``.

Relative paths are relative to the working directory the run starts in (the project root in
the README's commands; the job's working_dir under ``ray job submit``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; ``problems`` lists every one of them with its field path."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")


class Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------------------- run
class RunSection(Section):
    name: str = Field("distill", description="Human name of the run; prefixes the run id.")
    output_dir: Path = Field(
        Path("runs"),
        description="Where runs/<run_id>/ is written. On a multi-node cluster this must be "
        "a path every node sees (NFS, a mounted bucket).",
    )
    run_id: str | None = Field(
        None, description="Fixed run id (re-use a run folder); default: <name>-<timestamp>."
    )
    seed: int = Field(0, description="Seed for every random choice of the run.")


class RaySection(Section):
    address: str | None = Field(
        None,
        description="Ray cluster to join ('auto', 'ray://host:10001'). Default: RAY_ADDRESS "
        "from the environment, else an embedded local Ray.",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of the embedded local Ray (default: all of this machine)."
    )
    runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="runtime_env passed to ray.init when joining a cluster."
    )


# -------------------------------------------------------------------------------------- task
class PromptSection(Section):
    template: str | None = Field(
        None, description="Prompt sent to the teacher (and the student); holds `placeholder`."
    )
    file: Path | None = Field(None, description="Read the template from this file instead.")
    placeholder: str = Field("{input}", description="Where the input text goes in the template.")
    system: str | None = Field(None, description="Optional system message before the prompt.")

    @model_validator(mode="after")
    def _one_source(self) -> PromptSection:
        if (self.template is None) == (self.file is None):
            raise ValueError("give exactly one of 'template' or 'file'")
        if self.template is not None and self.placeholder not in self.template:
            raise ValueError(f"template does not contain the placeholder {self.placeholder!r}")
        return self

    def text(self) -> str:
        """The template text (reading `file` when given)."""
        if self.template is not None:
            return self.template
        text = Path(self.file).read_text(encoding="utf-8")
        if self.placeholder not in text:
            raise ConfigError(
                [f"task.prompt.file: {self.file} does not contain the placeholder {self.placeholder!r}"]
            )
        return text


class TaskSection(Section):
    name: str = Field("task", description="Name of the task (used in reports and the manifest).")
    prompt: PromptSection
    label_key: str = Field(
        "label", description="Key of the label in the teacher's structured (JSON) answer."
    )
    labels: list[str] = Field(
        description="Allowed label values, as strings (e.g. ['0', '1']).", min_length=2
    )
    label_aliases: dict[str, str] = Field(
        default_factory=lambda: {"true": "1", "false": "0"},
        description="Spellings mapped to a label before checking (keys compared lower-case).",
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_strings(cls, v: Any) -> Any:
        # `labels: [0, 1]` in YAML means the strings the parser compares against.
        if isinstance(v, list):
            return [str(x) if isinstance(x, int | float) and not isinstance(x, bool) else x for x in v]
        return v

    @model_validator(mode="after")
    def _distinct_labels(self) -> TaskSection:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels}")
        return self


# ----------------------------------------------------------------------------------- teacher
class ReplaySource(Section):
    path: Path = Field(description="CSV/JSONL/Parquet file of recorded teacher responses.")
    input_field: str = Field("comment_text", description="Column holding the input text.")
    response_field: str = Field("simple_prompt", description="Column holding the raw response.")


class SimulatorSection(Section):
    enabled: bool = Field(
        False, description="Start the built-in teacher simulator for this run and use it."
    )
    host: str = Field("127.0.0.1", description="Interface the simulator listens on.")
    port: int = Field(0, ge=0, le=65535, description="Port (0: any free port).")
    replay: list[ReplaySource] = Field(
        default_factory=list, description="Tables of recorded responses, keyed by input text."
    )
    rule: Literal["quickstart"] | None = Field(
        None, description="Answer the built-in synthetic quickstart task by its rule."
    )
    error_rate: float = Field(
        0.1, ge=0.0, le=1.0, description="Share of rule answers that are deliberately wrong."
    )
    latency_ms: float = Field(0.0, ge=0.0, description="Added latency per request.")
    seed: int = Field(0, description="Seed of the simulator's random choices.")


class TeacherSection(Section):
    base_url: str | None = Field(
        None,
        description="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1. "
        "Left empty when the simulator is enabled (its address is used).",
    )
    model: str = Field("gpt-4o-mini", description="Model name sent to the endpoint.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable holding the API key (never logged)."
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature.")
    max_tokens: int = Field(256, gt=0, description="Max tokens of one teacher answer.")
    timeout_s: float = Field(60.0, gt=0, description="Timeout of one request attempt.")
    max_attempts: int = Field(5, gt=0, description="Attempts per request, first one included.")
    actors: int = Field(2, gt=0, description="Teacher-calling actors in the Ray Data pool.")
    per_actor_concurrency: int = Field(
        16, gt=0, description="In-flight requests per actor (asyncio, one event loop)."
    )
    batch_size: int = Field(32, gt=0, description="Rows per Ray Data batch sent to an actor.")
    num_cpus_per_actor: float = Field(
        0.25, gt=0, description="CPUs reserved per actor (the work is mostly waiting on I/O)."
    )
    simulator: SimulatorSection = Field(default_factory=SimulatorSection)

    @model_validator(mode="after")
    def _endpoint(self) -> TeacherSection:
        if self.base_url is None and not self.simulator.enabled:
            raise ValueError("base_url is required unless simulator.enabled is true")
        return self


# -------------------------------------------------------------------------------------- data
class LogSource(Section):
    path: Path = Field(description="A log file (JSONL, CSV or Parquet).")
    format: Literal["auto", "jsonl", "csv", "parquet"] = Field(
        "auto", description="File format; 'auto' goes by the extension."
    )
    input_field: str = Field(
        "input",
        description="Field with the input text. OpenAI-style records "
        "({'request': {'messages': ...}, 'response': {'choices': ...}}) are recognised "
        "without it.",
    )
    response_field: str | None = Field(
        None, description="Field with a recorded raw teacher response (not re-sent)."
    )
    gold_field: str | None = Field(None, description="Field with a human gold label.")
    limit: int | None = Field(None, gt=0, description="Read at most this many records.")


class SeedsSection(Section):
    path: Path = Field(description="JSONL/CSV/Parquet of hand-written example inputs.")
    input_field: str = Field("input", description="Field with the example input text.")
    n_new: int = Field(100, ge=0, description="New inputs to generate from the seeds.")
    per_request: int = Field(10, gt=0, description="New inputs asked for in one request.")
    examples_per_request: int = Field(
        4, gt=0, description="Seed examples shown in one request (rotating subsets)."
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature.")
    template: str = Field(
        "Here are examples of inputs for the task '{task}':\n{examples}\n\n"
        "Write {n} new, different inputs in the same style. Answer with a JSON list of "
        "strings only.",
        description="Expansion prompt; {task}, {examples} and {n} are filled in.",
    )


class DataSection(Section):
    logs: list[LogSource] = Field(default_factory=list, description="Production logs to read.")
    seeds: SeedsSection | None = Field(None, description="Seed examples the teacher expands.")

    @model_validator(mode="after")
    def _some_input(self) -> DataSection:
        if not self.logs and self.seeds is None:
            raise ValueError("give at least one of 'logs' or 'seeds'")
        return self


# ------------------------------------------------------------------------------------ curate
class CurateSection(Section):
    min_chars: int = Field(1, ge=0, description="Drop inputs shorter than this (characters).")
    max_chars: int = Field(20_000, gt=0, description="Drop inputs longer than this.")
    max_response_chars: int = Field(20_000, gt=0, description="Drop longer teacher answers.")
    exclude_patterns: list[str] = Field(
        default_factory=list, description="Regexes; an input matching one is dropped."
    )
    dedup: Literal["exact", "none"] = Field(
        "exact", description="'exact': drop repeated inputs (case/whitespace-insensitive)."
    )
    drop_test_overlap: bool = Field(
        True, description="Drop training inputs that appear in an evaluation test set."
    )

    @field_validator("exclude_patterns")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        import re

        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"pattern {p!r} does not compile: {e}") from e
        return v


# ------------------------------------------------------------------------------------- train
class TinyModelSection(Section):
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(128, gt=0)
    max_position_embeddings: int = Field(512, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelSection:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        return self


class StudentSection(Section):
    model: str = Field(
        "tiny",
        description="'tiny': a small causal LM built from `tiny` with a tokenizer made from "
        "the training data (no download). Otherwise a hub id or local path for "
        "AutoModelForCausalLM.from_pretrained.",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer hub id or path (default: the model's own)."
    )
    tiny: TinyModelSection = Field(default_factory=TinyModelSection)


class LoraSection(Section):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters."
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained fully beside the adapters."
    )


class DeepSpeedSection(Section):
    enabled: bool = Field(True, description="Wrap training in DeepSpeed.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage.")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer state offload to CPU.")


class TrainSection(Section):
    student: StudentSection = Field(default_factory=StudentSection)
    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters or all weights.")
    lora: LoraSection = Field(default_factory=LoraSection)
    epochs: int = Field(3, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, gt=0, description="Examples per step per worker.")
    gradient_accumulation_steps: int = Field(1, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_seq_len: int = Field(256, gt=8, description="Longer examples are truncated (prompt side).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many steps (smoke runs).")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Held out for validation loss.")
    num_workers: int = Field(2, gt=0, description="Ray Train workers (one per GPU when use_gpu).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision.")
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    target: Literal["canonical", "raw"] = Field(
        "canonical",
        description="What the student learns to answer: 'canonical' = the parsed answer as "
        "compact JSON; 'raw' = the teacher's text as returned.",
    )

    @model_validator(mode="after")
    def _gpu_precision(self) -> TrainSection:
        if self.precision != "fp32" and not self.use_gpu:
            raise ValueError(f"precision {self.precision!r} needs use_gpu: true")
        return self


# ------------------------------------------------------------------------------------- sweep
class SweepSection(Section):
    learning_rate: list[float] | None = Field(None, description="Learning rates to try.")
    batch_size: list[int] | None = Field(None, description="Per-worker batch sizes to try.")
    lora_r: list[int] | None = Field(None, description="LoRA ranks to try.")
    lora_alpha: list[int] | None = Field(None, description="LoRA alphas to try.")
    epochs: list[int] | None = Field(None, description="Epoch counts to try.")
    fractions: list[float] = Field(
        default_factory=lambda: [1.0],
        description="Dataset-size fractions (nested subsets of the training set).",
    )
    metric: Literal["val_loss"] = Field("val_loss", description="Metric that picks the best.")
    num_workers: int = Field(1, gt=0, description="Train workers per trial.")
    max_concurrent_trials: int = Field(1, gt=0)

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0 < f <= 1]
        if bad or not v:
            raise ValueError(f"fractions must be non-empty and in (0, 1], got {v}")
        return v


# ---------------------------------------------------------------------------------- evaluate
class EvalSetSection(Section):
    name: str = Field(description="Name shown in reports (e.g. 'balanced').")
    path: Path = Field(description="JSONL/CSV/Parquet with inputs and gold labels.")
    input_field: str = Field("input")
    gold_field: str = Field("label")
    limit: int | None = Field(None, gt=0, description="Use only the first N rows.")


class EvaluateSection(Section):
    test_sets: list[EvalSetSection] = Field(default_factory=list)
    teacher: bool = Field(True, description="Also score the teacher on the test sets.")
    max_new_tokens: int = Field(32, gt=0, description="Student answer length in evaluation.")
    batch_size: int = Field(32, gt=0)


# ------------------------------------------------------------------------------------- serve
class ServeSection(Section):
    enabled: bool = Field(True, description="Deploy the student after evaluation.")
    host: str = Field("127.0.0.1")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0: any free port).")
    weights: dict[Literal["student", "teacher"], float] = Field(
        default_factory=lambda: {"student": 0.9, "teacher": 0.1},
        description="Traffic split between targets.",
    )
    smoke_requests: int = Field(20, ge=0, description="Requests sent through the router.")
    keep_running: bool = Field(False, description="Keep serving after the run (Ctrl-C stops).")
    num_cpus_per_replica: float = Field(0.25, gt=0)
    max_new_tokens: int = Field(64, gt=0)

    @field_validator("weights")
    @classmethod
    def _weights_positive(cls, v: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError(f"weights must be >= 0 and sum to > 0, got {v}")
        return v


# -------------------------------------------------------------------------------------- root
class DistillConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    ray: RaySection = Field(default_factory=RaySection)
    task: TaskSection
    teacher: TeacherSection
    data: DataSection
    curate: CurateSection = Field(default_factory=CurateSection)
    train: TrainSection = Field(default_factory=TrainSection)
    sweep: SweepSection | None = None
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    serve: ServeSection = Field(default_factory=ServeSection)


# ------------------------------------------------------------------------------------ loading
def _format_error(err: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "<root>"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("missing", "extra_forbidden"):
        return f"{path}: {msg}"
    return f"{path}: {msg}, got {err.get('input')!r}"


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError([f"--set {assignment!r}: expected KEY=VALUE, e.g. train.epochs=2"])
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError([f"--set {assignment!r}: {part!r} is not a section"])
        node = child
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (), *, data: dict | None = None) -> DistillConfig:
    """Load a YAML config (or a dict), apply ``a.b=c`` overrides, validate everything."""
    source = str(path) if path is not None else "config"
    if data is None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError([f"file not found: {path}"], source) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], source)
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return DistillConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError([_format_error(err) for err in e.errors()], source) from None


def dump_config(cfg: DistillConfig) -> dict[str, Any]:
    """The resolved config as plain data (secrets never live in it: keys come from the env)."""
    return cfg.model_dump(mode="json")
