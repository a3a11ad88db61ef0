"""The async teacher client: any OpenAI-compatible endpoint through ``openai.AsyncOpenAI``.

The retry loop is ours (the SDK's is off, ``max_retries=0``): exponential backoff with full
jitter for 408/409/429/5xx, timeouts and connection errors, honouring ``Retry-After`` /
``retry-after-ms``; any other 4xx fails at once. The aiohttp transport is used because, on small
machines, it sustains several times the request rate of the default httpx one.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Protocol

import httpx2
import openai

from ray_pipeline.teacher.quota import PICO, Estimate

RETRYABLE_STATUS = frozenset({408, 409, 429})


class Gate(Protocol):
    """The shared quota seen from one request (``quota.BoundGate``)."""

    async def acquire(self) -> None: ...
    def release(self, tokens: int = 0, cost: float = 0.0, ok: bool = True) -> None: ...
    async def rate_limited(self, retry_after_s: float | None) -> None: ...


@dataclass
class TeacherReply:
    texts: list[str]  # one per requested sample (n)
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # of the successful attempt
    attempts: int
    cost: float = 0.0  # USD, from the price table (0 when no price is known)
    cached: bool = False
    # Per sample, the answer's token logprobs (``token_logprobs``) when they were asked for and
    # returned; None when no sample has any.
    logprobs: list[list[dict[str, Any]] | None] | None = None


class TeacherCallError(Exception):
    """A request that failed for good: carries what the row records."""

    def __init__(self, message: str, error_class: str, status_code: int | None, attempts: int):
        super().__init__(message)
        self.error_class = error_class
        self.status_code = status_code
        self.attempts = attempts

    def __reduce__(self):
        # Crosses process boundaries (Ray tasks, Serve replicas) with all its fields.
        return (TeacherCallError, (str(self), self.error_class, self.status_code, self.attempts))


def cost_usd(
    prompt_tokens: int, completion_tokens: int, price: tuple[float, float] | None
) -> float:
    """USD for this usage at `price` (USD per million prompt / completion tokens), in whole
    pico-dollars (so that sums over rows and the quota's total agree exactly)."""
    if price is None:
        return 0.0
    return round((prompt_tokens * price[0] + completion_tokens * price[1]) * 1e6) / PICO


def estimate(
    messages: list[dict[str, Any]],
    max_tokens: int,
    n: int = 1,
    price: tuple[float, float] | None = None,
) -> Estimate:
    """An upper bound of what one chat request can use, from its own messages, `max_tokens`
    and `n`: every sample stops at `max_tokens`; a prompt has at most one token per 3 bytes of
    UTF-8 (BPE vocabularies hold every common 3-byte sequence; English runs about 4 characters a
    token), plus the chat framing OpenAI counts (4 tokens a message, 3 to prime the answer)."""
    prompt = 3 + sum(4 + math.ceil(len(str(m.get("content") or "").encode()) / 3) for m in messages)
    completion = max_tokens * n
    cost = 0.0
    if price is not None:
        # Rounded up to a whole pico-dollar: the reservation never falls below the cost.
        cost = math.ceil((prompt * price[0] + completion * price[1]) * 1e6) / PICO
    return Estimate(tokens=prompt + completion, cost=cost)


def token_logprobs(choice: Any) -> list[dict[str, Any]] | None:
    """A choice's token logprobs as rows keep them (``teacher_logprobs``): one entry per answer
    token, ``{"token": str, "logprob": float, "top": [[token, logprob], ...]}`` with the
    alternatives as returned (most likely first); None when the choice has none."""
    content = choice.logprobs.content if choice.logprobs is not None else None
    if content is None:
        return None
    return [
        {
            "token": t.token,
            "logprob": t.logprob,
            "top": [[a.token, a.logprob] for a in t.top_logprobs],
        }
        for t in content
    ]


def retry_after_s(headers: Any) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` or ``retry-after``), if any."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / scale)
        except ValueError:
            continue  # an HTTP date: treated as no hint (backoff applies)
    return None


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff before attempt `attempt + 1`."""
    return rng.uniform(0, min(max_s, base_s * 2 ** (attempt - 1)))


class TeacherClient:
    """One endpoint + model. Create it inside the event loop that will use it."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        *,
        timeout_s: float = 60.0,
        max_attempts: int = 5,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_connections: int = 1000,
        seed: int | None = None,
        price: tuple[float, float] | None = None,
    ):
        self.model = model
        self.price = price  # USD per million (prompt, completion) tokens
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._rng = random.Random(seed)
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key,
            max_retries=0,
            timeout=timeout_s,
            http_client=openai.DefaultAioHttpClient(
                timeout=timeout_s,
                limits=httpx2.Limits(
                    max_connections=max_connections, max_keepalive_connections=max_connections
                ),
            ),
        )

    async def complete(
        self, messages: list[dict[str, Any]], gate: Gate | None = None, **params: Any
    ) -> TeacherReply:
        """One chat completion (``params``: temperature, max_tokens, n, seed, ...), retried.

        With a `gate`, every attempt first waits for a start slot of the shared rate limit
        and budget (``BudgetExhausted`` propagates), and reports how it ended."""
        for attempt in range(1, self.max_attempts + 1):
            if gate is not None:
                await gate.acquire()
            started = time.perf_counter()
            try:
                resp = await self._client.chat.completions.create(
                    model=self.model, messages=messages, **params
                )
                if not resp.choices:
                    raise ValueError("the answer has no choices")
            except openai.APIStatusError as e:
                code = e.status_code
                hint = retry_after_s(e.response.headers)
                if gate is not None:
                    if code == 429:
                        await gate.rate_limited(hint)
                    else:
                        gate.release(ok=False)
                retryable = code in RETRYABLE_STATUS or code >= 500
                if not retryable or attempt == self.max_attempts:
                    raise TeacherCallError(_message(e), type(e).__name__, code, attempt) from e
                await asyncio.sleep(hint if hint is not None else self._backoff(attempt))
                continue
            except (openai.APIConnectionError, openai.APIResponseValidationError, ValueError) as e:
                # Connection errors and timeouts, and 200s whose body is not a chat completion
                # (truncated or malformed JSON): transient, retried with backoff.
                if gate is not None:
                    gate.release(ok=False)
                if attempt == self.max_attempts:
                    raise TeacherCallError(_message(e), type(e).__name__, None, attempt) from e
                await asyncio.sleep(self._backoff(attempt))
                continue
            latency = time.perf_counter() - started
            usage = resp.usage
            prompt_tokens = usage.prompt_tokens if usage else 0
            completion_tokens = usage.completion_tokens if usage else 0
            cost = cost_usd(prompt_tokens, completion_tokens, self.price)
            if gate is not None:
                gate.release(prompt_tokens + completion_tokens, cost)
            logprobs = [token_logprobs(c) for c in resp.choices]
            return TeacherReply(
                texts=[c.message.content or "" for c in resp.choices],
                model=resp.model or self.model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                latency_s=latency,
                attempts=attempt,
                cost=cost,
                logprobs=logprobs if any(lp is not None for lp in logprobs) else None,
            )
        raise AssertionError("unreachable: the loop returns or raises")

    def _backoff(self, attempt: int) -> float:
        return backoff_s(attempt, self.backoff_base_s, self.backoff_max_s, self._rng)

    async def aclose(self) -> None:
        await self._client.close()


def _message(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text[:500]
