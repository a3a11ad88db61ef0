"""The teacher behind Ray Serve: requests go to the OpenAI-compatible teacher through the
teacher stage's client (its timeouts and retries, ``teacher.timeout_s``/``max_attempts``),
and, when the config sets a rate limit or a budget, through the same shared quota the
generate stage uses (``teacher/quota.py``): one ``TeacherQuota`` replica holds it for every
proxy replica, which leases start slots and budget from it in batches.

Failures become error replies the router passes on: the budget spent is 429
``insufficient_quota`` (as OpenAI says it), a teacher still rate-limiting after its retries
429, a teacher refusing the request (another 4xx) 400 with its message, anything else 502.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from ray import serve

from ray_pipeline.teacher.quota import Quota

log = logging.getLogger("distill.serve")


def error_reply(e: Exception) -> dict[str, Any]:
    """The router's error reply for a teacher call that failed for good."""
    from ray_pipeline.teacher.quota import BudgetExhausted

    if isinstance(e, BudgetExhausted):
        return {
            "error": {
                "status": 429,
                "message": f"The teacher's budget is spent: {e}",
                "code": "insufficient_quota",
            }
        }
    code = e.status_code  # a TeacherCallError
    if code == 429:
        return {
            "error": {
                "status": 429,
                "message": f"The teacher is rate-limiting after {e.attempts} attempts: {e}",
                "code": "rate_limit_exceeded",
            }
        }
    if code is not None and 400 <= code < 500 and code not in (408, 409):
        return {
            "error": {
                "status": 400,
                "message": f"The teacher refused the request ({code}): {e}",
                "code": "teacher_refused",
            }
        }
    return {
        "error": {
            "status": 502,
            "message": f"The teacher failed after {e.attempts} attempt(s): {e.error_class}: {e}",
            "code": "upstream_error",
        }
    }


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class TeacherQuota:
    """The shared quota (rate limits and budget) of every teacher proxy replica."""

    def __init__(
        self,
        endpoint: str,
        rpm: float | None,
        tpm: float | None,
        max_cost_usd: float | None,
        max_tokens: int | None,
    ):
        self.quota = Quota({endpoint: {"rpm": rpm, "tpm": tpm}}, max_cost_usd, max_tokens)

    async def lease(self, *args: Any) -> Any:
        return self.quota.lease(*args)

    async def settle(self, *args: Any) -> float:
        return self.quota.settle(*args)

    async def outcomes(self, *args: Any) -> float:
        return self.quota.outcomes(*args)

    async def snapshot(self) -> dict[str, Any]:
        return self.quota.snapshot()


@serve.deployment(max_ongoing_requests=256)
class TeacherProxy:
    """The API key is read from the replica's environment (``api_key_env``), never passed
    through the Serve config, which Serve stores."""

    def __init__(
        self,
        teacher: dict[str, Any],
        base_url: str,
        api_key_env: str | None,
        quota: Any = None,
    ):
        from ray_pipeline.config import TeacherSection

        self.cfg = TeacherSection.model_validate(teacher)
        self.base_url = base_url
        key = os.environ.get(api_key_env) if api_key_env else "none"
        if not key:
            raise RuntimeError(
                f"teacher.api_key_env: the environment variable {api_key_env} (the teacher's "
                "API key) is not set on this replica"
            )
        self._key = key
        self.quota = quota
        price = self.cfg.prices.get(self.cfg.model)
        self.price = (price.input_per_mtok, price.output_per_mtok) if price else None
        self._client = None
        self._gate = None
        self._flusher: asyncio.Task | None = None

    def _start(self) -> None:
        # Client, gate and flusher belong to the replica's event loop: made on first use.
        from ray_pipeline.teacher.client import TeacherClient
        from ray_pipeline.teacher.quota import LeaseGate

        c = self.cfg
        self._client = TeacherClient(
            self.base_url,
            c.model,
            self._key,
            timeout_s=c.timeout_s,
            max_attempts=c.max_attempts,
            backoff_base_s=c.backoff_base_s,
            backoff_max_s=c.backoff_max_s,
            price=self.price,
        )
        if self.quota is not None:
            self._gate = LeaseGate(self.quota, self.base_url.rstrip("/"), c.rate_limit.lease_size)
            self._flusher = asyncio.get_running_loop().create_task(self._flush_every(1.0))

    async def _flush_every(self, seconds: float) -> None:
        # Spend and outcomes reach the shared quota once a second, not once per request.
        while True:
            await asyncio.sleep(seconds)
            await self._gate.flush()

    async def answer(
        self, messages: list[dict[str, str]], max_tokens: int, stop: list[str] | None = None
    ) -> dict[str, Any]:
        """A reply (``protocol.Reply`` fields) or an error reply (``error_reply``)."""
        from ray_pipeline.teacher.client import TeacherCallError, estimate
        from ray_pipeline.teacher.quota import BudgetExhausted

        if self._client is None:
            self._start()
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": self.cfg.temperature}
        if stop:
            params["stop"] = stop
        gate = None
        if self._gate is not None:
            gate = self._gate.bind(estimate(messages, max_tokens, 1, self.price))
        try:
            reply = await self._client.complete(messages, gate, **params)
        except (TeacherCallError, BudgetExhausted) as e:
            return error_reply(e)
        try:
            reply.texts[0].encode("utf-8")
        except UnicodeEncodeError:
            # A JSON escape of a lone surrogate: no UTF-8 response (or log line) can hold it.
            message = "The teacher answered text that is not valid Unicode (a lone surrogate)."
            return {"error": {"status": 502, "message": message, "code": "upstream_error"}}
        return {
            "text": reply.texts[0],
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            # The client keeps no finish reason: an answer of max_tokens was cut there.
            "finish_reason": "length" if reply.completion_tokens >= max_tokens else "stop",
            "confidence": None,
            "probs": None,
        }

    async def __del__(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        if self._gate is not None:
            await self._gate.close()  # unused budget goes back to the quota
        if self._client is not None:
            await self._client.aclose()
