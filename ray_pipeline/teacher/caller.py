"""Asking the teacher about rows: the main teacher and its voters, cache, quota, retries.

``TeacherCaller`` is plain Python over lists of row dicts (tested without Ray, against the
simulator over HTTP); ``session.TeacherSession`` runs it as a Ray Data actor pool.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from ray_pipeline.config import TeacherSection
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.data.schema import FAILED, OK, dumps, to_table
from ray_pipeline.teacher.cache import ResponseCache, cache_key
from ray_pipeline.teacher.client import TeacherCallError, TeacherClient, TeacherReply, estimate
from ray_pipeline.teacher.quota import BudgetExhausted, LeaseGate


def needs_teacher(row: dict[str, Any]) -> bool:
    return row["status"] == OK and row["response"] is None


@dataclass(frozen=True)
class TeacherEndpoint:
    """The teacher a run calls, resolved: the simulator started for it, or the configured API."""

    base_url: str
    api_key: str  # never logged or written
    # What the response cache and the rate limit know the endpoint by: its base URL, or for
    # the simulator a hash of the settings that change its answers (not its random port).
    identity: str


@dataclass(frozen=True)
class AskSpec:
    """One teacher asked about every row: the main teacher or a voter."""

    name: str  # "main" or the voter's name
    endpoint: str  # identity for the cache and the rate limit (TeacherEndpoint.identity)
    base_url: str
    api_key: str
    model: str
    params: dict[str, Any]  # temperature, max_tokens, n
    prompt: Prompt | None = None  # the voter's own prompt; None: the row's messages
    price: tuple[float, float] | None = None  # USD per million prompt / completion tokens


def ask_specs(
    cfg: TeacherSection,
    endpoint: TeacherEndpoint,
    params: dict[str, Any] | None = None,
    voters: bool = True,
    model: str | None = None,
) -> list[AskSpec]:
    """The main teacher and its voters, resolved against the running endpoint. `params` go to
    the main teacher's requests only (over its temperature, max_tokens and n): the seed
    expansion's sampling, the generate stage's logprob request. `model` asks another model of
    the main teacher's endpoint (the curate judge). Voters on another endpoint read their key
    from their own environment variable."""

    def price(model: str) -> tuple[float, float] | None:
        p = cfg.prices.get(model)
        return (p.input_per_mtok, p.output_per_mtok) if p else None

    main_params = {
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
        "n": cfg.n,
        **(params or {}),
    }
    base_url, ident = endpoint.base_url, endpoint.identity
    main_model = model or cfg.model
    specs = [
        AskSpec(
            "main",
            ident,
            base_url,
            endpoint.api_key,
            main_model,
            main_params,
            None,
            price(main_model),
        )
    ]
    for v in cfg.voters if voters else []:
        own = v.base_url is not None and v.base_url != base_url
        key = endpoint.api_key
        if own or v.api_key_env:
            env = v.api_key_env or cfg.api_key_env
            key = os.environ.get(env, "")
            if not key:
                raise RuntimeError(
                    f"teacher.voters[{v.name}]: environment variable {env} is not set"
                )
        model = v.model or cfg.model
        vp = {
            "temperature": cfg.temperature if v.temperature is None else v.temperature,
            "max_tokens": cfg.max_tokens,
            "n": v.n,
        }
        prompt = (
            Prompt(v.prompt.text(), v.prompt.placeholder, v.prompt.system) if v.prompt else None
        )
        specs.append(
            AskSpec(
                v.name,
                v.base_url.rstrip("/") if own else ident,
                v.base_url if own else base_url,
                key,
                model,
                vp,
                prompt,
                price(model),
            )
        )
    return specs


@dataclass
class Answer:
    spec: AskSpec
    reply: TeacherReply | None = None
    error: TeacherCallError | None = None
    budget: str | None = None  # why the call was not made (budget exhausted)


class TeacherCaller:
    """Fills ``response`` (and its ``teacher_logprobs`` when asked for, usage, cost, latency,
    attempts, votes) of every row that still needs an answer; a row whose main request fails
    for good is marked ``failed`` with the error, one whose call the budget refused with
    ``budget_exhausted``.

    Identical requests are answered from the response cache; every attempt takes a start
    slot from the shared quota (rate limits, budget). Used as a Ray Data actor (one event
    loop per actor, ``per_actor_concurrency`` requests in flight) and directly in tests.
    """

    def __init__(
        self,
        specs: list[AskSpec],
        teacher: dict[str, Any],
        quota: Any = None,
        cache_dir: str | None = None,
    ):
        self.cfg = TeacherSection.model_validate(teacher)
        self.specs = specs
        self.quota = quota
        self.cache = ResponseCache(cache_dir) if cache_dir else None
        self._clients: dict[str, TeacherClient] = {}
        self._gates: dict[str, LeaseGate] = {}
        self._sem: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _client(self, spec: AskSpec) -> TeacherClient:
        # Created lazily: clients, gates and the semaphore belong to the loop that runs them.
        key = f"{spec.base_url}|{spec.model}|{spec.price}"
        if key not in self._clients:
            self._clients[key] = TeacherClient(
                spec.base_url,
                spec.model,
                spec.api_key,
                timeout_s=self.cfg.timeout_s,
                max_attempts=self.cfg.max_attempts,
                backoff_base_s=self.cfg.backoff_base_s,
                backoff_max_s=self.cfg.backoff_max_s,
                max_connections=self.cfg.per_actor_concurrency,
                price=spec.price,
            )
        return self._clients[key]

    def _gate(self, endpoint: str) -> LeaseGate | None:
        if self.quota is None:
            return None
        if endpoint not in self._gates:
            lease = min(self.cfg.rate_limit.lease_size, self.cfg.per_actor_concurrency)
            self._gates[endpoint] = LeaseGate(self.quota, endpoint, lease)
        return self._gates[endpoint]

    async def _ask(
        self, spec: AskSpec, row: dict[str, Any], messages: list[dict[str, Any]]
    ) -> Answer:
        if spec.prompt is not None and row["input"] is not None:
            messages = spec.prompt.messages(row["input"])
        params = dict(spec.params)
        if params.get("temperature", 0) > 0:
            # A stable per-row seed: sampled answers differ across rows, repeat across runs.
            params.setdefault("seed", int(row["id"][:8], 16))
        key = (
            cache_key(spec.endpoint, spec.model, messages, params)
            if self.cache is not None
            else None
        )
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                reply = TeacherReply(**hit)
                reply.cached, reply.cost = True, 0.0  # no money spent this time
                return Answer(spec, reply)
        gate = self._gate(spec.endpoint)
        if gate is not None:
            # This request's own bound: its messages, max_tokens and samples, at its price.
            est = estimate(messages, params["max_tokens"], params.get("n", 1), spec.price)
            gate = gate.bind(est)
        async with self._sem:
            try:
                reply = await self._client(spec).complete(messages, gate, **params)
            except TeacherCallError as e:
                return Answer(spec, error=e)
            except BudgetExhausted as e:
                return Answer(spec, budget=str(e))
        if key is not None:
            self.cache.put(key, asdict(reply))
        return Answer(spec, reply)

    async def _fill(self, row: dict[str, Any]) -> None:
        messages = json.loads(row["messages"])
        answers = await asyncio.gather(*(self._ask(spec, row, messages) for spec in self.specs))
        main = answers[0]
        # What this run paid for the row: every teacher and sample answered by a call (main,
        # voters, also when the main request failed); answers from the cache cost nothing.
        paid = [a.reply for a in answers if a.reply is not None and not a.reply.cached]
        row.update(
            prompt_tokens=sum(r.prompt_tokens for r in paid),
            completion_tokens=sum(r.completion_tokens for r in paid),
            cost=sum(r.cost for r in paid),
        )
        counts = {
            "rows_done": 1,
            "cache_hits": sum(1 for a in answers if a.reply and a.reply.cached),
            "calls": len(paid),
        }
        if main.reply is None:
            counts["errors"] = 1
            if main.budget is not None:
                row.update(
                    status=FAILED,
                    reason=f"budget_exhausted: {main.budget}",
                    error_class="BudgetExhausted",
                )
            else:
                e = main.error
                row.update(
                    status=FAILED,
                    reason=f"teacher_error: {e}",
                    error_class=e.error_class,
                    status_code=e.status_code,
                    attempts=e.attempts,
                )
            row["teacher"] = main.spec.model
        else:
            r = main.reply
            logprobs = r.logprobs[0] if r.logprobs is not None else None
            row.update(
                response=r.texts[0],
                teacher_logprobs=dumps(logprobs) if logprobs is not None else None,
                teacher=r.model,
                latency_s=r.latency_s,
                attempts=r.attempts,
                cached=r.cached,
            )
        if len(answers) > 1 or main.spec.params.get("n", 1) > 1:
            row["votes"] = dumps(votes_of(answers))
        gate = self._gate(main.spec.endpoint)  # progress goes through the main gate
        if gate is not None:
            gate.count(**counts)

    async def call_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.cfg.per_actor_concurrency)
            self._loop = asyncio.get_running_loop()
        await asyncio.gather(*(self._fill(r) for r in rows if needs_teacher(r)))
        for gate in self._gates.values():
            await gate.flush()  # progress and spend reach the quota once per batch
        return rows

    async def aclose(self) -> None:
        for gate in self._gates.values():
            await gate.close()
        for client in self._clients.values():
            await client.aclose()

    def __del__(self) -> None:
        # Ray Data deletes the UDF when its actor shuts down: return unused budget
        # reservations and close the HTTP sessions on their loop (still running then).
        if self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self.aclose(), self._loop).result(timeout=10)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        return to_table(await self.call_rows(batch.to_pylist()))


def votes_of(answers: list[Answer]) -> list[dict[str, Any]]:
    """Every sample of every teacher asked about a row (labels are added when parsing)."""
    out = []
    for a in answers:
        if a.reply is None:
            out.append(
                {
                    "teacher": a.spec.name,
                    "sample": None,
                    "response": None,
                    "error": a.budget or str(a.error),
                }
            )
            continue
        for i, text in enumerate(a.reply.texts):
            out.append({"teacher": a.spec.name, "sample": i, "response": text})
    return out
