"""Row components of the generate stage: teacher calls, answer parsing, seed expansion.

Plain Python over lists of row dicts (unit-tested without Ray); ``stage.py`` wires them into
Ray Data.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from ray_pipeline.config import SeedsSection, TaskSection, TeacherSection
from ray_pipeline.data.schema import FAILED, OK, dumps, new_row, row_id, to_table
from ray_pipeline.teacher.cache import ResponseCache, cache_key
from ray_pipeline.teacher.client import TeacherCallError, TeacherClient, TeacherReply
from ray_pipeline.teacher.parse import parse_answer, parse_list
from ray_pipeline.teacher.prompts import Prompt
from ray_pipeline.teacher.quota import BudgetExhausted, LeaseGate


def needs_teacher(row: dict[str, Any]) -> bool:
    return row["status"] == OK and row["response"] is None


@dataclass(frozen=True)
class AskSpec:
    """One teacher asked about every row: the main teacher or a voter."""

    name: str  # "main" or the voter's name
    endpoint: str  # identity for the cache and the rate limit: base URL, or "simulator"
    base_url: str
    api_key: str
    model: str
    params: dict[str, Any]  # temperature, max_tokens, n
    prompt: Prompt | None = None  # the voter's own prompt; None: the row's messages
    price: tuple[float, float] | None = None  # USD per million prompt / completion tokens


def ask_specs(
    cfg: TeacherSection,
    base_url: str,
    api_key: str,
    simulator: bool,
    params: dict[str, Any] | None = None,
    voters: bool = True,
) -> list[AskSpec]:
    """The main teacher and its voters, resolved against the running endpoint. Voters on
    another endpoint read their key from their own environment variable."""
    import os

    def price(model: str) -> tuple[float, float] | None:
        p = cfg.prices.get(model)
        return (p.input_per_mtok, p.output_per_mtok) if p else None

    main_params = {
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
        "n": cfg.n,
        **(params or {}),
    }
    ident = f"simulator:{cfg.simulator.seed}" if simulator else base_url
    specs = [
        AskSpec("main", ident, base_url, api_key, cfg.model, main_params, None, price(cfg.model))
    ]
    for v in cfg.voters if voters else []:
        own = v.base_url is not None and v.base_url != base_url
        key = api_key
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
                v.base_url if own else ident,
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
    """Fills ``response`` (and usage, cost, latency, attempts, votes) of every row that still
    needs an answer; a row whose main request fails for good is marked ``failed`` with the
    error, one whose call the budget refused with ``budget_exhausted``.

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

    def _gate(self, spec: AskSpec, messages: list[dict[str, Any]]) -> LeaseGate | None:
        if self.quota is None:
            return None
        if spec.endpoint not in self._gates:
            n = spec.params.get("n", 1)
            # Estimated tokens of one request, for TPM and the budget: the prompt (~3
            # characters a token, on the safe side) and the longest answer allowed.
            prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 3 + 1
            est_tokens = prompt_tokens + spec.params.get("max_tokens", 256) * n
            est_cost = 0.0
            if spec.price is not None:
                est_cost = (
                    prompt_tokens * spec.price[0]
                    + spec.params.get("max_tokens", 256) * n * spec.price[1]
                ) / 1e6
            lease = min(self.cfg.rate_limit.lease_size, self.cfg.per_actor_concurrency)
            self._gates[spec.endpoint] = LeaseGate(
                self.quota, spec.endpoint, lease, est_tokens, est_cost
            )
        return self._gates[spec.endpoint]

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
        gate = self._gate(spec, messages)
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
        gate = self._gate(main.spec, messages)  # progress goes through it
        counts = {
            "rows_done": 1,
            "cache_hits": sum(1 for a in answers if a.reply and a.reply.cached),
            "calls": sum(1 for a in answers if a.reply and not a.reply.cached),
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
            row.update(
                response=r.texts[0],
                teacher=r.model,
                prompt_tokens=sum(a.reply.prompt_tokens for a in answers if a.reply),
                completion_tokens=sum(a.reply.completion_tokens for a in answers if a.reply),
                cost=sum(a.reply.cost for a in answers if a.reply),
                latency_s=r.latency_s,
                attempts=r.attempts,
                cached=r.cached,
            )
        if len(answers) > 1 or main.spec.params.get("n", 1) > 1:
            row["votes"] = dumps(votes_of(answers))
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


def parse_rows(rows: list[dict[str, Any]], task: TaskSection) -> list[dict[str, Any]]:
    """Parse each answered row's response into ``output`` and ``label``. An answer with no
    structured value in it fails the row; a parsed answer without a valid label keeps
    ``label`` empty for curation to filter with its reason."""
    for row in rows:
        if row["status"] != OK or row["response"] is None or row["output"] is not None:
            continue
        if row["votes"] is not None:
            votes = json.loads(row["votes"])
            for v in votes:
                if v.get("response") is not None:
                    v["label"] = parse_answer(
                        v["response"], task.label_key, task.labels, task.label_aliases
                    ).label
            row["votes"] = dumps(votes)
        parsed = parse_answer(row["response"], task.label_key, task.labels, task.label_aliases)
        if parsed.output is None:
            row.update(status=FAILED, reason=parsed.error)
            continue
        row.update(output=dumps(parsed.output), label=parsed.label)
    return rows


def expansion_rows(
    seeds: list[str], sc: SeedsSection, task: TaskSection, seed: int
) -> list[dict[str, Any]]:
    """The requests that expand the seeds into ``sc.n_new`` new inputs: each shows a
    different random subset of the seeds, in a different order (diversity)."""
    if not seeds:
        raise ValueError(f"{sc.path}: no seed examples")
    rows = []
    for i in range(math.ceil(sc.n_new / sc.per_request)):
        rng = random.Random(f"{seed}:{i}")
        examples = rng.sample(seeds, min(sc.examples_per_request, len(seeds)))
        n = min(sc.per_request, sc.n_new - i * sc.per_request)
        # Topics and personas rotate (not sampled): every one is used evenly.
        slots = {
            "task": task.name,
            "examples": "\n".join(f"- {e}" for e in examples),
            "n": n,
            "topic": sc.topics[i % len(sc.topics)] if sc.topics else "",
            "persona": sc.personas[i % len(sc.personas)] if sc.personas else "",
        }
        prompt = sc.template.format(**slots)
        rows.append(
            new_row(
                id=row_id(f"seeds:{sc.path}", f"expansion:{seed}:{i}"),
                source=f"seeds:{sc.path}",
                source_line=i,
                messages=dumps([{"role": "user", "content": prompt}]),
            )
        )
    return rows


def synthetic_input_rows(
    answered: list[dict[str, Any]], seeds: list[str], sc: SeedsSection, prompt: Prompt
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """New input rows from answered expansion requests, deduplicated (case and whitespace
    insensitive) against the seeds and each other, at most ``sc.n_new``; plus counts."""
    seen = {" ".join(s.lower().split()) for s in seeds}
    out: list[dict[str, Any]] = []
    counts = {
        "requests": len(answered),
        "failed_requests": 0,
        "generated": 0,
        "duplicates": 0,
        "kept": 0,
    }
    source = f"seeds:{sc.path}"
    for row in answered:
        if row["status"] != OK:
            counts["failed_requests"] += 1
            continue
        for text in parse_list(row["response"]):
            counts["generated"] += 1
            key = " ".join(text.lower().split())
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            if len(out) < sc.n_new:
                out.append(
                    new_row(
                        id=row_id(source, text),
                        source=source,
                        source_line=len(out),
                        input=text,
                        messages=dumps(prompt.messages(text)),
                        prompt_hash=prompt.hash,
                    )
                )
    counts["kept"] = len(out)
    return out, counts
