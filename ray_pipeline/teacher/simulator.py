"""The teacher simulator: a real OpenAI-compatible HTTP server for offline runs and tests.

It answers ``POST /v1/chat/completions`` and ``GET /v1/models``:

* from **replay tables** of recorded responses keyed by input text (e.g. every Jigsaw
  ``*.responses.csv``, answering with its ``simple_prompt`` column), the input being recovered
  from the prompt by the task's template;
* for the built-in **quickstart** task (is a comment toxic?) and **qa** task (short questions,
  ``ray_pipeline.data.qa``) by their rules, wrong on a configurable share of answers;
* for **seed expansion** prompts (the run's expansion template) with new inputs of the rule's
  task (quickstart comments, or qa questions);
* for **judge** prompts (the run's ``curate.judge.rubric``, when the judge is on) with a score
  1-5 and a reason (``judgement``): by the rule where one applies, else a seeded draw;
* for **evaluation judge** prompts (``evaluate.judge.prompt`` of a generative task) with a
  score on the configured scale by the token overlap of the answer with the reference
  (``overlap_judgement``): a deterministic stand-in for a judge model.

Answers carry token ``usage`` (about 4 characters per token) after a latency drawn from a fixed,
normal or lognormal distribution. Asked for ``logprobs`` (and ``top_logprobs``), an answer
carries its token logprobs in the OpenAI format: the label value is a token of its own whose
alternatives are the task's other labels, with the probabilities of the simulator's calibrated
confidence model (``label_confidence``); every other token is certain.

Like a production API it can also misbehave, each at its own rate: 429 with ``Retry-After``,
500, 503, hangs past the client's timeout, 200s whose body is not JSON, and 200s whose answer
is prose with nothing to parse. A per-API-key requests-per-minute limit answers 429 to clients
that do not share a rate limiter.

Faults are drawn from a seeded random stream, one draw per admitted request, so the n-th request
of a run meets the same fault in every run with the same seed, while a *retry* of a request is a
new draw and can succeed (a fault that hashed the request content would fail every retry).

Every setting is the run config's ``teacher.simulator`` section (plus the task's prompt and
label key, the teacher's model name and the seeds' expansion template): ``Simulator(cfg)``.
This module is the answer model, a plain class; ``sim_server`` serves it over HTTP
(``distill teacher-sim CONFIG``) and runs it as a child process. The request path is kept lean
(no per-request logging, one JSON decode and encode, a few random draws): it shares small
machines with load generators.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_pipeline.config import DistillConfig
from ray_pipeline.data import qa, synthetic
from ray_pipeline.data.manifest import file_sha256
from ray_pipeline.data.prompts import Prompt, last_user_content
from ray_pipeline.data.schema import normalize_label
from ray_pipeline.data.sources import read_records
from ray_pipeline.teacher.parse import ParseError, label_pattern, parse_answer, parse_structured

# Fault kind -> the setting holding its rate; rate bands are laid out on [0, 1) in this order.
FAULT_RATES = {
    "rate_limit": "rate_429",
    "server_error": "rate_500",
    "unavailable": "rate_503",
    "hang": "rate_hang",
    "malformed": "rate_malformed",
    "unparsable": "rate_unparsable",
}
FAULT_KINDS = tuple(FAULT_RATES)

_dumps = json.JSONEncoder(separators=(",", ":")).encode


CHARS_PER_TOKEN = 4


def count_tokens(text: str) -> int:
    """The simulator's tokenizer: about 4 characters a token (at least 1)."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def count_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Prompt tokens as OpenAI counts chat messages: each message's content plus 3 tokens of
    framing, and 3 more that prime the answer."""
    return 3 + sum(3 + count_tokens(str(m.get("content") or "")) for m in messages)


def load_replay(path: str | Path, input_field: str, response_field: str) -> dict[str, str]:
    """{input text: recorded response} from a CSV/JSONL/Parquet file."""
    table: dict[str, str] = {}
    for i, rec in enumerate(read_records(path), 1):
        if input_field not in rec or response_field not in rec:
            raise ValueError(f"{path}: record {i} lacks {input_field!r} or {response_field!r}")
        if rec[response_field] not in (None, ""):
            table[str(rec[input_field])] = str(rec[response_field])
    return table


def judgement(
    text: str,
    answer: str,
    rule: str | None,
    task: tuple[str, list[str], dict[str, str]],
    seed: int,
) -> str:
    """The simulated judge's JSON verdict on `answer` to the input `text`. With the quickstart
    rule: 5 for the right label in JSON, 4 for the right label in another format, 2 for a
    wrong label; 1 for an answer without a valid label (any task); otherwise a seeded draw
    from 1 to 5 (there is no truth to judge by)."""
    label_key, labels, aliases = task
    if rule == "qa":
        return _qa_judgement(text, answer)
    if labels is None:  # a generative task without a rule: no truth to judge by
        score = 1 + int(synthetic.stable_fraction("judge", seed, text, answer) * 5)
        return json.dumps({"score": score, "reason": "a simulated judgement (no rule)"})
    parsed = parse_answer(answer, label_key, labels, aliases)
    if parsed.label is None:
        score, why = 1, "the answer has no valid label"
    elif rule == "quickstart":
        if parsed.label != synthetic.true_label(text):
            score, why = 2, f"the label {parsed.label} is wrong for this comment"
        elif parsed.mode == "json":
            score, why = 5, "the right label, in the requested JSON"
        else:
            score, why = 4, "the right label, not in plain JSON"
    else:
        score = 1 + int(synthetic.stable_fraction("judge", seed, text, answer) * 5)
        why = "a simulated judgement (no rule for this task)"
    return json.dumps({"score": score, "reason": why})


def _answer_value(answer: str) -> tuple[str | None, str]:
    """(the "answer" value of a qa answer or None, the parse mode)."""
    try:
        value, mode = parse_structured(answer)
    except ParseError:
        return None, "none"
    if isinstance(value, dict) and isinstance(value.get("answer"), str | int | float):
        return str(value["answer"]), mode
    return None, mode


def _qa_judgement(question: str, answer: str) -> str:
    """The qa rule's judge: 5 for the right answer as bare JSON, 4 for the right answer
    otherwise formatted (a fence), 2 for a wrong answer, 1 for no "answer" at all."""
    value, _ = _answer_value(answer)
    bare = answer.strip().startswith("{")
    if value is None:
        score, why = 1, 'the answer has no "answer" value'
    elif value.strip().casefold() != qa.true_answer(question).casefold():
        score, why = 2, f"{value!r} is not the right answer"
    elif bare:
        score, why = 5, "the right answer, in the requested JSON"
    else:
        score, why = 4, "the right answer, not in plain JSON"
    return json.dumps({"score": score, "reason": why})


_WORD = re.compile(r"\w+")


def _answer_words(text: str) -> list[str]:
    """The words of an answer, lower-case; of a JSON object or list, the words of its values
    (its keys are format, not content)."""
    try:
        value, _ = parse_structured(text)
    except ParseError:
        value = text
    if isinstance(value, dict):
        value = " ".join(str(v) for v in value.values())
    elif isinstance(value, list):
        value = " ".join(str(v) for v in value)
    return _WORD.findall(str(value).casefold())


def overlap_judgement(reference: str, answer: str, low: int, high: int) -> str:
    """The simulated evaluation judge's verdict: the F1 of the words the answer shares with
    the reference (``_answer_words``: a JSON answer's values, not its keys), mapped onto the
    scale low..high and rounded. Equal answers get `high`, answers with no word in common
    `low`."""
    ref, ans = Counter(_answer_words(reference)), Counter(_answer_words(answer))
    common = sum((ref & ans).values())
    f1 = 0.0 if not common else 2 * common / (sum(ref.values()) + sum(ans.values()))
    score = round(low + f1 * (high - low))
    return json.dumps({"score": score, "reason": f"word overlap F1 {f1:.2f} with the reference"})


def eval_judge_template(cfg: DistillConfig) -> str:
    """evaluate.judge.prompt with its scale filled in: {input}, {reference}, {answer} left."""
    j = cfg.evaluate.judge
    return j.prompt.replace("{min_score}", str(j.min_score)).replace(
        "{max_score}", str(j.max_score)
    )


def _slots_regex(template: str, names: tuple[str, ...]) -> re.Pattern:
    """A regex for a template whose {name} slots (only `names`; a slot may repeat) become
    groups; everything else is literal."""
    pattern = "|".join(re.escape("{" + n + "}") for n in names)
    parts = re.split(f"({pattern})", template)
    seen: set[str] = set()
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(part))
            continue
        name = part[1:-1]
        out.append(f"(?P={name})" if name in seen else f"(?P<{name}>.*?)")
        seen.add(name)
    return re.compile("^" + "".join(out) + "$", re.S)


def _template_regex(template: str) -> re.Pattern:
    """A regex for a str.format-style template whose {names} become named groups."""
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        out.append(re.escape(part) if i % 2 == 0 else f"(?P<{part}>.*?)")
    return re.compile("^" + "".join(out) + "$", re.S)


# Settings that change when an answer arrives, or where the server listens, but never what it
# says: left out of the simulator's identity in the response cache's key.
_TIMING_ONLY = ("enabled", "host", "port", "latency_ms", "latency_dist", "latency_sigma")


def simulator_identity(cfg: DistillConfig) -> str:
    """The simulator as an endpoint identity for the response cache: a hash of every setting
    that changes its answers (rule, error rate, seed, faults, limits, the replay tables'
    contents, the label key), so that changing one never serves answers cached under another."""
    sim = cfg.teacher.simulator
    settings = sim.model_dump(mode="json", exclude=set(_TIMING_ONLY))
    settings["replay"] = [
        {**r.model_dump(mode="json"), "sha256": file_sha256(r.path)} for r in sim.replay
    ]
    # What its label tokens and their alternatives are (logprobs).
    settings["label_key"] = cfg.task.label_key
    settings["labels"] = cfg.task.labels
    settings["label_aliases"] = cfg.task.label_aliases
    judge = cfg.evaluate.judge
    if judge.enabled:  # the overlap judge's scores depend on the scale, not only the prompt
        settings["eval_judge_scale"] = [judge.min_score, judge.max_score]
    blob = json.dumps(settings, sort_keys=True).encode()
    return f"simulator:{hashlib.sha256(blob).hexdigest()[:16]}"


# The mass a sure answer leaves to the other labels: its label's logprob is about -1e-4.
SURE_REST = 1e-4
MAX_TOP_LOGPROBS = 20  # OpenAI's limit

# The simulator's tokenizer for logprobs, GPT-style: a word or a 1-3 digit number with the space
# before it, a run of punctuation, whitespace. The pieces of a text join back to the text.
_PIECE = re.compile(r" ?[^\W\d_]+| ?\d{1,3}| ?(?:[^\w\s]|_)+|\s+(?!\S)|\s+")


def label_confidence(draw: float, error_rate: float) -> float:
    """The probability the simulated teacher gives the label it answers, from the same draw
    that decides whether the answer is wrong (``synthetic.error_draw`` below `error_rate`).

    Calibrated, and unsure where it errs (as real teachers are, which is what a student can
    learn from logprobs): the draws below 3 x error_rate hold every wrong answer and twice as
    many right ones, and get their accuracy (2/3) as confidence; the rest, all right, are sure
    (1 - SURE_REST). From error_rate 1/3 on, every answer gets 1 - error_rate."""
    band = min(1.0, 3 * error_rate)
    confidence = 1.0 - error_rate / band if draw < band else 1.0
    return min(max(confidence, SURE_REST), 1.0 - SURE_REST)


def answer_tokens(
    text: str, label_key: str, labels: list[str], aliases: dict[str, str]
) -> tuple[list[str], int | None, str | None]:
    """The simulator's tokens of an answer (they join back to it), the index of the token
    holding the label value and that label; (tokens, None, None) when the answer has no label
    the parser would read (prose, a cut-off answer). The label value is a token of its own:
    ``{"toxic": 1}`` is ``{"``, ``toxic``, ``":``, a space, ``1``, ``}``."""
    m = label_pattern(label_key).search(text)
    label = normalize_label(m.group(1), labels, aliases) if m is not None else None
    # Only where the parser reads the same label: a value the regex finds in prose before the
    # real answer is no label token.
    if label is None or parse_answer(text, label_key, labels, aliases).label != label:
        return _PIECE.findall(text), None, None
    start, end = m.span(1)
    head = _PIECE.findall(text[:start])
    return [*head, text[start:end], *_PIECE.findall(text[end:])], len(head), label


def label_probs(label: str, labels: list[str], confidence: float) -> dict[str, float]:
    """{label: probability}: `confidence` on the answered label, the rest shared evenly by the
    others (for two labels: all of it on the other one)."""
    rest = (1.0 - confidence) / (len(labels) - 1)
    return {lab: confidence if lab == label else rest for lab in labels}


def _logprob(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def logprobs_content(
    tokens: list[str], label_at: int | None, label: str | None, probs: dict[str, float], top: int
) -> list[dict[str, Any]]:
    """``choices[i].logprobs.content`` of an answer: one entry per token with its `top` most
    likely alternatives. The label token (at `label_at`, saying `label`) has the task's labels
    as alternatives with the probabilities `probs` (the answered one spelled as in the text);
    every other token is certain, its only alternative itself."""
    out = []
    for i, token in enumerate(tokens):
        if i != label_at:
            out.append({**_logprob(token, 0.0), "top_logprobs": [_logprob(token, 0.0)][:top]})
            continue
        ranked = sorted(probs, key=lambda lab: -probs[lab])  # stable: ties keep the task's order
        alternatives = [
            _logprob(token if lab == label else lab, math.log(probs[lab])) for lab in ranked
        ]
        out.append({**_logprob(token, math.log(probs[label])), "top_logprobs": alternatives[:top]})
    return out


@dataclass(slots=True)
class Reply:
    """What the HTTP layer sends: after waiting `delay_s`, `status` with `body` (JSON bytes,
    unless the fault is 'malformed') and `headers`."""

    status: int
    body: bytes
    delay_s: float = 0.0
    headers: dict[str, str] | None = None
    fault: str | None = None


class RpmLimiter:
    """Per-key token bucket: `burst` tokens, refilled at rpm/60 per second; one per request."""

    def __init__(
        self, rpm: float, burst: int | None = None, clock: Callable[[], float] = time.monotonic
    ):
        self.rate = rpm / 60.0
        self.burst = float(burst if burst is not None else max(1, math.ceil(self.rate)))
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def acquire(self, key: str) -> float | None:
        """None when the request may go; else the seconds until this key has a token again."""
        now = self.clock()
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return None
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


def retry_after_headers(wait_s: float) -> dict[str, str]:
    """Retry-After in whole seconds (rounded up, as HTTP requires), and exact in milliseconds."""
    return {"retry-after": str(math.ceil(wait_s)), "retry-after-ms": str(math.ceil(wait_s * 1000))}


# What a teacher says when it does not follow the format: no braces, no "key: value".
_PROSE = (
    "I'm sorry, but I can't make a judgement about this text without more context.",
    "This is a nuanced case. Some readers would find it offensive and others would not, so "
    "it is hard to say either way.",
    "Let me think about this step by step. The wording is blunt, but bluntness alone does "
    "not decide the question.",
)
# A proxy's error page, served as a 200: the kind of body a client must survive.
_NOT_JSON = b"<html><head><title>502 Bad Gateway</title></head><body>upstream reset</body></html>"


class Simulator:
    """The simulator's answers, limits and faults, as a plain class (HTTP: ``sim_server``)."""

    def __init__(self, cfg: DistillConfig, clock: Callable[[], float] = time.monotonic):
        spec = cfg.teacher.simulator
        self.spec = spec
        self.model = cfg.teacher.model
        self.label_key = cfg.task.label_key
        self.labels = cfg.task.labels
        self.label_aliases = cfg.task.label_aliases
        self.clock = clock
        # Inputs are recovered from the task's prompt and from every voter's own prompt.
        self.prompts = [Prompt.from_task(cfg.task)] + [
            Prompt(v.prompt.text(), v.prompt.placeholder, v.prompt.system)
            for v in cfg.teacher.voters
            if v.prompt is not None
        ]
        self.replay: dict[str, str] = {}
        for src in spec.replay:
            self.replay.update(load_replay(src.path, src.input_field, src.response_field))
        seeds = cfg.data.seeds
        self._expansion = _template_regex(seeds.template) if seeds is not None else None
        judge = cfg.curate.judge
        self._judge = _slots_regex(judge.rubric, ("input", "answer")) if judge.enabled else None
        ej = cfg.evaluate.judge
        self._eval_judge = (
            _slots_regex(eval_judge_template(cfg), ("input", "reference", "answer"))
            if ej.enabled
            else None
        )
        self._scale = (ej.min_score, ej.max_score)
        # Separate streams, so changing the latency distribution leaves which requests fault alone.
        self._fault_rng = random.Random(f"{spec.seed}:faults")
        self._latency_rng = random.Random(f"{spec.seed}:latency")
        self._bands: list[tuple[float, str]] = []  # (upper end, kind) on [0, 1)
        upper = 0.0
        for kind, name in FAULT_RATES.items():
            rate = getattr(spec, name)
            if rate > 0:
                upper += rate
                self._bands.append((upper, kind))
        self.limiter = (
            RpmLimiter(spec.rpm_per_key, spec.rpm_burst, clock) if spec.rpm_per_key else None
        )
        self._429 = _dumps(
            _error(
                f"Rate limit reached for requests (simulated). Please try again in {spec.retry_after_s:g}s.",
                "requests",
                "rate_limit_exceeded",
            )
        ).encode()
        self._429_headers = retry_after_headers(spec.retry_after_s)
        self._500 = _dumps(
            _error(
                "The server had an error while processing your request. Sorry about that! (simulated)",
                "server_error",
            )
        ).encode()
        self._503 = _dumps(
            _error(
                "The engine is currently overloaded, please try again later. (simulated)",
                "server_error",
                "service_unavailable",
            )
        ).encode()
        self._id_prefix = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        self._served = 0
        self.in_flight = 0  # kept by the HTTP layer
        self.reset_metrics()

    # ---------------------------------------------------------------- metrics
    def reset_metrics(self) -> None:
        self.counts: Counter[str] = Counter()
        self.status_counts: Counter[int] = Counter()
        self.fault_counts: Counter[str] = Counter()
        self.max_in_flight = self.in_flight
        self._since = self.clock()
        # When the first request of this measurement came and the last answer left: the
        # server's view of a client's throughput, free of the client's start-up time.
        self.first_request_at: float | None = None
        self.last_reply_at: float | None = None

    def metrics(self) -> dict[str, Any]:
        """Counts since start (or the last reset): requests, ok (well-formed completions),
        per status code, per fault kind, rate_limited (by the per-key RPM limit), tokens of the
        ok answers, and the requests in flight now."""
        c = self.counts
        return {
            "requests": c["requests"],
            "ok": c["ok"],
            "rate_limited": c["rate_limited"],
            "prompt_tokens": c["prompt_tokens"],
            "completion_tokens": c["completion_tokens"],
            "total_tokens": c["prompt_tokens"] + c["completion_tokens"],
            **{k: v for k, v in c.items() if k not in _METRIC_KEYS},  # rule, replay, not_found, ...
            "status": {str(k): v for k, v in sorted(self.status_counts.items())},
            "faults": {kind: self.fault_counts[kind] for kind in FAULT_KINDS},
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "elapsed_s": round(self.clock() - self._since, 3),
            "busy_s": None
            if self.first_request_at is None or self.last_reply_at is None
            else round(self.last_reply_at - self.first_request_at, 4),
            # Since the start (or the reset): when the first request came, the last answer left.
            "first_request_after_s": None
            if self.first_request_at is None
            else round(self.first_request_at - self._since, 4),
            "last_reply_after_s": None
            if self.last_reply_at is None
            else round(self.last_reply_at - self._since, 4),
        }

    # --------------------------------------------------------------- requests
    def reply(self, raw: bytes, api_key: str = "") -> Reply:
        """The whole answer to one chat-completion request body: limits, faults, latency."""
        self.counts["requests"] += 1
        r = self._reply(raw, api_key)
        self.status_counts[r.status] += 1
        if r.fault is not None:
            self.fault_counts[r.fault] += 1
        return r

    def _reply(self, raw: bytes, api_key: str) -> Reply:
        try:
            body = json.loads(raw)
        except ValueError as e:
            self.counts["bad_request"] += 1
            return Reply(
                400, _dumps(_error(f"body is not JSON: {e}", "invalid_request_error")).encode()
            )
        if not isinstance(body, dict):
            self.counts["bad_request"] += 1
            return Reply(
                400, _dumps(_error("body must be a JSON object", "invalid_request_error")).encode()
            )
        if self.limiter is not None:
            wait = self.limiter.acquire(api_key)
            if wait is not None:
                self.counts["rate_limited"] += 1
                msg = f"Rate limit reached for requests per minute (simulated): limit {self.spec.rpm_per_key:g} per key. Please try again in {wait:.3f}s."
                return Reply(
                    429,
                    _dumps(_error(msg, "requests", "rate_limit_exceeded")).encode(),
                    0.0,
                    retry_after_headers(wait),
                )
        fault = self._draw_fault()
        if fault == "rate_limit":  # a real API refuses at once
            return Reply(429, self._429, 0.0, self._429_headers, fault)
        delay = self._draw_latency()
        if fault == "server_error":
            return Reply(500, self._500, delay, None, fault)
        if fault == "unavailable":
            return Reply(503, self._503, delay, None, fault)
        status, payload = self.answer(body, unparsable=fault == "unparsable")
        if status != 200:  # the request itself is wrong: no fault to show on it
            return Reply(status, _dumps(payload).encode(), delay)
        data = _dumps(payload).encode()
        if fault == "malformed":
            return Reply(
                200, data[: len(data) // 2] if self._served % 2 else _NOT_JSON, delay, None, fault
            )
        usage = payload["usage"]
        self.counts["ok"] += 1
        self.counts["prompt_tokens"] += usage["prompt_tokens"]
        self.counts["completion_tokens"] += usage["completion_tokens"]
        return Reply(200, data, self.spec.hang_s if fault == "hang" else delay, None, fault)

    def _draw_fault(self) -> str | None:
        if not self._bands:
            return None
        u = self._fault_rng.random()
        for upper, kind in self._bands:
            if u < upper:
                return kind
        return None

    def _draw_latency(self) -> float:
        """Seconds to wait before answering (never negative)."""
        mean, sigma, dist = self.spec.latency_ms, self.spec.latency_sigma, self.spec.latency_dist
        if mean <= 0:
            return 0.0
        if dist == "fixed" or sigma == 0:
            return mean / 1000
        if dist == "normal":
            return max(0.0, self._latency_rng.gauss(mean, sigma * mean)) / 1000
        return self._latency_rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma) / 1000

    def _input_of(self, prompt_text: str) -> str:
        for p in self.prompts:
            extracted = p.extract(prompt_text)
            if extracted is not None:
                return extracted
        return prompt_text

    def answer(self, body: dict[str, Any], unparsable: bool = False) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for a chat-completion request body, without faults; with
        `unparsable`, the answer is prose instead of the structured one."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, _error("'messages' must be a non-empty list", "invalid_request_error")
        user = last_user_content(messages)
        if user is None:
            return 400, _error("no user message with text content", "invalid_request_error")
        n = body.get("n") or 1
        if not isinstance(n, int) or not 1 <= n <= 16:
            return 400, _error(
                f"'n' must be an integer in [1, 16], got {n!r}", "invalid_request_error"
            )
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            return 400, _error(
                f"'max_tokens' must be a positive integer, got {max_tokens!r}",
                "invalid_request_error",
            )
        logprobs, top = body.get("logprobs"), body.get("top_logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            return 400, _error(
                f"'logprobs' must be a boolean, got {logprobs!r}", "invalid_request_error"
            )
        if top is not None and (
            not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS
        ):
            return 400, _error(
                f"'top_logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}",
                "invalid_request_error",
            )
        if top is not None and not logprobs:
            return 400, _error("'top_logprobs' needs 'logprobs': true", "invalid_request_error")
        answered = self._texts(user, n, body)
        if answered is None:
            self.counts["not_found"] += 1
            return 404, _error(
                "the simulator has no recorded response for this input and no rule for it",
                "not_found_error",
            )
        texts, draws = answered
        self._served += 1
        if unparsable:
            texts = [_PROSE[(self._served + i) % len(_PROSE)] for i in range(n)]
        # Like a real API, an answer stops at max_tokens (per sample), cut mid-text.
        finish = ["stop"] * n
        if max_tokens is not None:
            for i, t in enumerate(texts):
                if count_tokens(t) > max_tokens:
                    texts[i], finish[i] = t[: max_tokens * CHARS_PER_TOKEN], "length"
        prompt_tokens = count_prompt_tokens(messages)
        completion_tokens = sum(count_tokens(t) for t in texts)
        return 200, {
            "id": f"{self._id_prefix}{self._served:012x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "finish_reason": finish[i],
                    "logprobs": {"content": self._logprobs(t, draws[i], top or 0), "refusal": None}
                    if logprobs
                    else None,
                }
                for i, t in enumerate(texts)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _texts(
        self, user: str, n: int, body: dict[str, Any]
    ) -> tuple[list[str], list[float | None]] | None:
        """The n answers to a request, each with the draw its label's confidence comes from
        (None for an answer that is no label: seed expansion); None when there is no answer."""
        if self._expansion is not None:
            m = self._expansion.match(user)
            if m is not None:
                self.counts["expansion"] += 1
                return [self._expand(user, m, i, body) for i in range(n)], [None] * n
        if self._judge is not None:
            m = self._judge.match(user)
            if m is not None:
                self.counts["judge"] += 1
                task = (self.label_key, self.labels, self.label_aliases)
                verdict = judgement(m["input"], m["answer"], self.spec.rule, task, self.spec.seed)
                return [verdict] * n, [None] * n
        if self._eval_judge is not None:
            m = self._eval_judge.match(user)
            if m is not None:
                self.counts["eval_judge"] += 1
                verdict = overlap_judgement(m["reference"], m["answer"], *self._scale)
                return [verdict] * n, [None] * n
        text = self._input_of(user)
        seed = self.spec.seed
        if text in self.replay:
            self.counts["replay"] += 1
            # The recorded teacher's confidence is unknown: the rule's model stands in (its
            # unsure band is not tied to the recorded answer's errors). One draw per input:
            # identical answers, identical logprobs.
            return [self.replay[text]] * n, [synthetic.error_draw(text, seed)] * n
        if self.spec.rule == "quickstart":
            self.counts["rule"] += 1
            texts = [
                synthetic.format_answer(
                    synthetic.teacher_label(text, self.spec.error_rate, seed, sample=i),
                    text,
                    self.label_key,
                )
                for i in range(n)
            ]
            return texts, [synthetic.error_draw(text, seed, sample=i) for i in range(n)]
        if self.spec.rule == "qa":
            self.counts["rule"] += 1
            texts = [
                qa.format_answer(qa.teacher_answer(text, self.spec.error_rate, seed, i), text)
                for i in range(n)
            ]
            return texts, [None] * n  # no label token: every token of the answer is certain
        return None

    def _logprobs(self, text: str, draw: float | None, top: int) -> list[dict[str, Any]]:
        """The token logprobs of one answer (``logprobs_content``)."""
        if draw is None or self.labels is None:
            return logprobs_content(_PIECE.findall(text), None, None, {}, top)
        tokens, label_at, label = answer_tokens(
            text, self.label_key, self.labels, self.label_aliases
        )
        if label is None or draw is None:
            return logprobs_content(tokens, None, None, {}, top)
        probs = label_probs(label, self.labels, label_confidence(draw, self.spec.error_rate))
        return logprobs_content(tokens, label_at, label, probs, top)

    def _expand(self, user: str, m: re.Match, sample: int, body: dict[str, Any]) -> str:
        groups = m.groupdict()
        try:
            k = int(groups.get("n") or 5)
        except ValueError:
            k = 5
        seed = int(
            synthetic.stable_fraction(user, body.get("seed"), sample, self.spec.seed) * 2**31
        )
        if self.spec.rule == "qa":
            return json.dumps(qa.generate_questions(min(k, 100), seed))
        return json.dumps(synthetic.generate_comments(min(k, 100), seed))


_METRIC_KEYS = frozenset({"requests", "ok", "rate_limited", "prompt_tokens", "completion_tokens"})


def _error(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
