"""The teacher simulator: a real OpenAI-compatible HTTP server for offline runs and tests.

It answers ``POST /v1/chat/completions`` and ``GET /v1/models``:

* from **replay tables** of recorded responses keyed by input text (e.g. every Jigsaw
  ``*.responses.csv``, answering with its ``simple_prompt`` column), the input being recovered
  from the prompt by the task's template;
* for the built-in **quickstart** task by its rule, wrong on a configurable share of answers;
* for **seed expansion** prompts (the run's expansion template) with new quickstart-style inputs.

Answers carry token ``usage`` (about 4 characters per token) after a latency drawn from a fixed,
normal or lognormal distribution. Like a production API it can also misbehave, each at its own
rate: 429 with ``Retry-After``, 500, 503, hangs past the client's timeout, 200s whose body is
not JSON, and 200s whose answer is prose with nothing to parse. A per-API-key requests-per-minute
limit answers 429 to clients that do not share a rate limiter.

Faults are drawn from a seeded random stream, one draw per admitted request, so the n-th request
of a run meets the same fault in every run with the same seed, while a *retry* of a request is a
new draw and can succeed (a fault that hashed the request content would fail every retry).

``GET /metrics`` counts what was served; ``POST /metrics/reset`` zeroes the counts (benchmarks).
Start it with ``distill teacher-sim``. The request path is kept lean (no per-request logging, one
JSON decode and encode, a few random draws): it shares small machines with load generators.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from ray_pipeline.data import synthetic
from ray_pipeline.data.sources import read_records
from ray_pipeline.teacher.prompts import Prompt, last_user_content

LATENCY_DISTS = ("fixed", "normal", "lognormal")
# Fault kind -> the spec field holding its rate; rate bands are laid out on [0, 1) in this order.
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


def count_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def load_replay(path: str | Path, input_field: str, response_field: str) -> dict[str, str]:
    """{input text: recorded response} from a CSV/JSONL/Parquet file."""
    table: dict[str, str] = {}
    for i, rec in enumerate(read_records(path), 1):
        if input_field not in rec or response_field not in rec:
            raise ValueError(f"{path}: record {i} lacks {input_field!r} or {response_field!r}")
        if rec[response_field] not in (None, ""):
            table[str(rec[input_field])] = str(rec[response_field])
    return table


def _template_regex(template: str) -> re.Pattern:
    """A regex for a str.format-style template whose {names} become named groups."""
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        out.append(re.escape(part) if i % 2 == 0 else f"(?P<{part}>.*?)")
    return re.compile("^" + "".join(out) + "$", re.S)


@dataclass
class SimulatorSpec:
    model: str = "sim-teacher"
    replay: dict[str, str] = field(default_factory=dict)
    rule: str | None = None  # "quickstart"
    error_rate: float = 0.1
    latency_ms: float = 0.0  # mean latency of an answer
    seed: int = 0
    prompts: list[Prompt] = field(default_factory=list)  # to recover inputs from prompts
    expansion_template: str | None = None
    label_key: str = "toxic"
    # Latency spread: "normal" has std = sigma * mean (clipped at 0); "lognormal" has sigma as the
    # std of log-latency, its mean kept at latency_ms (for small sigma the two spreads agree).
    latency_dist: str = "fixed"
    latency_sigma: float = 0.5
    # Shares of requests that meet each fault (their sum is at most 1).
    rate_429: float = 0.0
    retry_after_s: float = 1.0  # the Retry-After of an injected 429
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_hang: float = 0.0
    hang_s: float = 120.0  # a hung request answers after this long (past the client's timeout)
    rate_malformed: float = 0.0
    rate_unparsable: float = 0.0
    rpm_per_key: float | None = None  # requests per minute per API key; None: unlimited
    rpm_burst: int | None = None  # requests a key may send at once; None: one second's worth

    def __post_init__(self) -> None:
        problems = []
        for name in ("error_rate", *FAULT_RATES.values()):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        total = sum(self.fault_rates().values())
        if total > 1.0 + 1e-9:
            problems.append(f"fault rates must sum to at most 1, got {total:g}")
        if self.latency_dist not in LATENCY_DISTS:
            problems.append(
                f"latency_dist must be one of {LATENCY_DISTS}, got {self.latency_dist!r}"
            )
        for name in ("latency_ms", "latency_sigma", "retry_after_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.hang_s <= 0:
            problems.append(f"hang_s must be > 0, got {self.hang_s}")
        if self.rpm_per_key is not None and self.rpm_per_key <= 0:
            problems.append(f"rpm_per_key must be > 0, got {self.rpm_per_key}")
        if self.rpm_burst is not None and self.rpm_burst < 1:
            problems.append(f"rpm_burst must be >= 1, got {self.rpm_burst}")
        if problems:
            raise ValueError("; ".join(problems))

    def fault_rates(self) -> dict[str, float]:
        return {kind: getattr(self, name) for kind, name in FAULT_RATES.items()}


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
    """The simulator's answers, limits and faults, as a plain class (HTTP is in `make_app`)."""

    def __init__(self, spec: SimulatorSpec, clock: Callable[[], float] = time.monotonic):
        self.spec = spec
        self.clock = clock
        self._expansion = (
            _template_regex(spec.expansion_template) if spec.expansion_template else None
        )
        # Separate streams, so changing the latency distribution leaves which requests fault alone.
        self._fault_rng = random.Random(f"{spec.seed}:faults")
        self._latency_rng = random.Random(f"{spec.seed}:latency")
        self._bands: list[tuple[float, str]] = []  # (upper end, kind) on [0, 1)
        upper = 0.0
        for kind, rate in spec.fault_rates().items():
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
        for p in self.spec.prompts:
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
        texts = self._texts(user, n, body)
        if texts is None:
            self.counts["not_found"] += 1
            return 404, _error(
                "the simulator has no recorded response for this input and no rule for it",
                "not_found_error",
            )
        self._served += 1
        if unparsable:
            texts = [_PROSE[(self._served + i) % len(_PROSE)] for i in range(n)]
        prompt_tokens = sum(count_tokens(str(m.get("content", ""))) for m in messages)
        completion_tokens = sum(count_tokens(t) for t in texts)
        return 200, {
            "id": f"{self._id_prefix}{self._served:012x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.spec.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
                for i, t in enumerate(texts)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _texts(self, user: str, n: int, body: dict[str, Any]) -> list[str] | None:
        if self._expansion is not None:
            m = self._expansion.match(user)
            if m is not None:
                self.counts["expansion"] += 1
                return [self._expand(user, m, i, body) for i in range(n)]
        text = self._input_of(user)
        if text in self.spec.replay:
            self.counts["replay"] += 1
            return [self.spec.replay[text]] * n
        if self.spec.rule == "quickstart":
            self.counts["rule"] += 1
            return [
                synthetic.format_answer(
                    synthetic.teacher_label(text, self.spec.error_rate, self.spec.seed, sample=i),
                    text,
                    self.spec.label_key,
                )
                for i in range(n)
            ]
        return None

    def _expand(self, user: str, m: re.Match, sample: int, body: dict[str, Any]) -> str:
        groups = m.groupdict()
        try:
            k = int(groups.get("n") or 5)
        except ValueError:
            k = 5
        seed = int(
            synthetic.stable_fraction(user, body.get("seed"), sample, self.spec.seed) * 2**31
        )
        return json.dumps(synthetic.generate_comments(min(k, 100), seed))


_METRIC_KEYS = frozenset({"requests", "ok", "rate_limited", "prompt_tokens", "completion_tokens"})


def _error(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _api_key(authorization: str | None) -> str:
    """The key of an ``Authorization: Bearer KEY`` header ('' when there is none)."""
    if not authorization:
        return ""
    scheme, _, key = authorization.partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def make_app(sim: Simulator) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        sim.in_flight += 1
        if sim.in_flight > sim.max_in_flight:
            sim.max_in_flight = sim.in_flight
        if sim.first_request_at is None:
            sim.first_request_at = sim.clock()
        try:
            r = sim.reply(await request.read(), _api_key(request.headers.get("Authorization")))
            if r.delay_s > 0:
                await asyncio.sleep(r.delay_s)
            return web.Response(
                body=r.body, status=r.status, headers=r.headers, content_type="application/json"
            )
        finally:
            sim.in_flight -= 1
            sim.last_reply_at = sim.clock()

    async def models(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": sim.spec.model,
                        "object": "model",
                        "created": 0,
                        "owned_by": "distill-simulator",
                    }
                ],
            }
        )

    async def metrics(_: web.Request) -> web.Response:
        return web.json_response(sim.metrics())

    async def reset_metrics(_: web.Request) -> web.Response:
        sim.reset_metrics()
        return web.json_response(sim.metrics())

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/metrics/reset", reset_metrics)
    app.router.add_get("/health", health)
    return app


def serve_forever(sim: Simulator, host: str, port: int, ready_file: str | None = None) -> None:
    """Run the server until killed; print (and optionally write) its base URL when listening."""

    async def main() -> None:
        runner = web.AppRunner(make_app(sim), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        bound = runner.addresses[0][1]
        url = f"http://{host}:{bound}/v1"
        print(f"teacher simulator listening on {url}", flush=True)
        if ready_file:
            tmp = Path(ready_file + ".tmp")
            tmp.write_text(url)
            tmp.rename(ready_file)
        await asyncio.Event().wait()

    asyncio.run(main())


def spec_from_config(cfg) -> SimulatorSpec:
    """The simulator a run config asks for (replay tables are read here)."""
    sim = cfg.teacher.simulator
    replay: dict[str, str] = {}
    for src in sim.replay:
        replay.update(load_replay(src.path, src.input_field, src.response_field))
    return SimulatorSpec(
        model=cfg.teacher.model,
        replay=replay,
        rule=sim.rule,
        error_rate=sim.error_rate,
        latency_ms=sim.latency_ms,
        seed=sim.seed,
        prompts=[Prompt.from_task(cfg.task)],
        expansion_template=cfg.data.seeds.template if cfg.data.seeds else None,
        label_key=cfg.task.label_key,
        latency_dist=sim.latency_dist,
        latency_sigma=sim.latency_sigma,
        rate_429=sim.rate_429,
        retry_after_s=sim.retry_after_s,
        rate_500=sim.rate_500,
        rate_503=sim.rate_503,
        rate_hang=sim.rate_hang,
        hang_s=sim.hang_s,
        rate_malformed=sim.rate_malformed,
        rate_unparsable=sim.rate_unparsable,
        rpm_per_key=sim.rpm_per_key,
        rpm_burst=sim.rpm_burst,
    )


@contextlib.contextmanager
def simulator_process(
    *args: str, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0
) -> Iterator[str]:
    """Run `distill teacher-sim ARGS` as a child process; yield its base URL once it listens;
    stop it on exit. Used by runs (``running_simulator``), tests and benchmarks."""
    with tempfile.TemporaryDirectory(prefix="distill-sim-") as tmp:
        ready = Path(tmp) / "url"
        with open(Path(tmp) / "sim.log", "w+") as log:
            cmd = [sys.executable, "-m", "ray_pipeline.cli", "teacher-sim", *args]
            cmd += ["--host", host, "--port", str(port), "--ready-file", str(ready)]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + timeout_s
                while not ready.exists():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(
                            f"teacher simulator did not start (exit code {proc.poll()}):\n"
                            f"{log.read()[-3000:]}"
                        )
                    time.sleep(0.05)
                yield ready.read_text()
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def running_simulator(config_file: str | Path, host: str = "127.0.0.1", port: int = 0):
    """The simulator a run config describes (`distill teacher-sim --from-config FILE`)."""
    return simulator_process("--from-config", str(config_file), host=host, port=port)
