"""The async teacher client: any OpenAI-compatible endpoint through ``openai.AsyncOpenAI``.

The retry loop is ours (the SDK's is off, ``max_retries=0``): exponential backoff with full
jitter for 408/409/429/5xx, timeouts and connection errors, honouring ``Retry-After`` /
``retry-after-ms``; any other 4xx fails at once. The aiohttp transport is used because, on small
machines, it sustains several times the request rate of the default httpx one.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx2
import openai

RETRYABLE_STATUS = frozenset({408, 409, 429})


@dataclass
class TeacherReply:
    texts: list[str]  # one per requested sample (n)
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # of the successful attempt
    attempts: int


class TeacherCallError(Exception):
    """A request that failed for good: carries what the row records."""

    def __init__(self, message: str, error_class: str, status_code: int | None, attempts: int):
        super().__init__(message)
        self.error_class = error_class
        self.status_code = status_code
        self.attempts = attempts


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
    ):
        self.model = model
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

    async def complete(self, messages: list[dict[str, Any]], **params: Any) -> TeacherReply:
        """One chat completion (``params``: temperature, max_tokens, n, seed, ...), retried."""
        for attempt in range(1, self.max_attempts + 1):
            started = time.perf_counter()
            try:
                resp = await self._client.chat.completions.create(
                    model=self.model, messages=messages, **params
                )
            except openai.APIStatusError as e:
                code = e.status_code
                retryable = code in RETRYABLE_STATUS or code >= 500
                if not retryable or attempt == self.max_attempts:
                    raise TeacherCallError(_message(e), type(e).__name__, code, attempt) from e
                hint = retry_after_s(e.response.headers)
                await asyncio.sleep(hint if hint is not None else self._backoff(attempt))
                continue
            except openai.APIConnectionError as e:  # includes APITimeoutError
                if attempt == self.max_attempts:
                    raise TeacherCallError(_message(e), type(e).__name__, None, attempt) from e
                await asyncio.sleep(self._backoff(attempt))
                continue
            latency = time.perf_counter() - started
            texts = [c.message.content or "" for c in resp.choices]
            usage = resp.usage
            return TeacherReply(
                texts=texts,
                model=resp.model or self.model,
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
                latency_s=latency,
                attempts=attempt,
            )
        raise AssertionError("unreachable: the loop returns or raises")

    def _backoff(self, attempt: int) -> float:
        return backoff_s(attempt, self.backoff_base_s, self.backoff_max_s, self._rng)

    async def aclose(self) -> None:
        await self._client.close()


def _message(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text[:500]
