"""Cluster-wide teacher quota: rate limits (RPM/TPM), the spending budget, 429 storms, progress.

One ``Quota`` per run lives in a Ray actor; every teacher-calling actor holds a ``LeaseGate``
that asks it for *leases*: batches of request start times and budget reservations, so the
quota actor sees one call per batch of requests, not one per request, and is no bottleneck.

Every request reserves its own estimate (``Estimate``: an upper bound of its tokens and cost,
from its own messages, ``max_tokens`` and ``n``) before it is sent, and settles it with what it
really used once it has ended; the budget stops cleanly once what is left cannot cover the next
request with nothing in flight that could give budget back. Costs are counted in whole
pico-dollars (``to_pico``), so that the quota's total and the sum over the rows are equal
exactly, whatever order they are added in.

Rate limiting is GCRA-style scheduling: each request (or its token estimate, for TPM) occupies
``60 / rpm`` seconds of the endpoint's timeline; a lease gets the next free start times.
A sporadic 429 only delays its own request (the client honours its ``Retry-After``). A *storm*
(at least ``storm_share`` of the responses seen in the last ``storm_window_s`` seconds are 429)
pauses the whole pool for the server's ``Retry-After`` and caps the rate at what actually got
through, recovering by 10% per quiet window up to the configured limit.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# A storm needs evidence: this many answers over at least this long (a handful of 429s in the
# first milliseconds says nothing about the rate the server accepts).
MIN_STORM_EVENTS = 20
MIN_STORM_SPAN_S = 0.25


PICO = 10**12  # pico-dollars in a dollar


def to_pico(usd: float) -> int:
    """USD as whole pico-dollars: integer sums are exact in any order."""
    return round(usd * PICO)


def from_pico(pico: int) -> float:
    return pico / PICO


class BudgetExhausted(Exception):
    """The run's cost or token budget is spent: no more teacher calls."""


@dataclass(frozen=True)
class Estimate:
    """At most what one request uses: reserved from the budget before it is sent, and what
    the TPM limit counts for it."""

    tokens: int
    cost: float  # USD, a whole number of pico-dollars


@dataclass
class Lease:
    delays: list[float]  # seconds from now at which each granted start slot may be used
    units: int = 0  # budget reservations granted, each of the estimate asked for
    stop: str | None = None  # the budget is spent: no more leases
    paused_for: float = 0.0  # pool-wide pause in force, seconds from now
    tight: bool = False  # fewer reservations granted than asked: the budget is nearly spent


@dataclass
class EndpointSchedule:
    rpm: float | None
    tpm: float | None
    next_free: float = 0.0
    paused_until: float = 0.0
    rate_cap: float | None = None  # requests/s allowed after a storm (None: configured rpm)
    events: deque = field(default_factory=deque)  # (time, was_429)


class Quota:
    """Plain class (unit-tested with a fake clock); ``QuotaActor`` runs it in Ray."""

    def __init__(
        self,
        limits: dict[str, dict[str, float | None]],
        max_cost_usd: float | None = None,
        max_tokens: int | None = None,
        storm_share: float | None = 0.3,
        storm_window_s: float = 5.0,
        burst_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.clock = clock
        now = clock()
        self.endpoints = {
            key: EndpointSchedule(rpm=lim.get("rpm"), tpm=lim.get("tpm"), next_free=now)
            for key, lim in limits.items()
        }
        self.burst_s = burst_s
        self.max_cost_usd = max_cost_usd
        self.max_tokens = max_tokens
        self.storm_share = storm_share
        self.storm_window_s = storm_window_s
        self.max_pico = to_pico(max_cost_usd) if max_cost_usd is not None else None
        self.spent_pico = 0
        self.spent_tokens = 0
        self.reserved_pico = 0
        self.reserved_tokens = 0
        self.budget_stop: str | None = None
        self.counters: Counter[str] = Counter()
        self.started = now
        self.storms = 0

    # -------------------------------------------------------------------------- leases
    def lease(
        self,
        endpoint: str,
        slots: int,
        units: int,
        est_tokens: int,
        est_pico: int,
        settlement: tuple | None = None,
    ) -> Lease:
        """Grant up to `slots` request start times on `endpoint` (each counting `est_tokens`
        against TPM) and up to `units` budget reservations of `est_tokens` and `est_pico`
        (pico-dollars) each; `settlement`: ``settle``'s arguments, applied first (one round
        trip for both).

        Fewer reservations than asked (maybe none, and then no start times either) while the
        budget left is held by requests in flight; none, with ``stop`` set, once the budget
        is spent with nothing left in flight."""
        if settlement is not None:
            self.settle(endpoint, *settlement)
        now = self.clock()
        ep = self.endpoints[endpoint]
        granted = self._budget_room(units, est_tokens, est_pico)
        self.reserved_tokens += granted * est_tokens
        self.reserved_pico += granted * est_pico
        if units and not granted:
            slots = 0  # no budget for the request: do not spend the rate on it
        interval = self._interval(ep, est_tokens)
        start = max(now, ep.paused_until)
        # GCRA: `next_free` is the theoretical arrival time of the next request; a request
        # may go up to `tolerance` before it (the burst), and pushes it on by one interval.
        tolerance = max(0.0, self.burst_s - interval)
        delays = []
        for _ in range(slots):
            t = max(start, ep.next_free - tolerance)
            ep.next_free = max(ep.next_free, t) + interval
            delays.append(t - now)
        self.counters["leases"] += 1
        return Lease(
            delays,
            granted,
            self.budget_stop,
            max(0.0, ep.paused_until - now),
            tight=granted < units,
        )

    def _interval(self, ep: EndpointSchedule, est_tokens: int) -> float:
        rates = []  # seconds per request implied by each limit
        if ep.rpm:
            rates.append(60.0 / ep.rpm)
        if ep.tpm:
            rates.append(60.0 * est_tokens / ep.tpm)
        if ep.rate_cap:
            rates.append(1.0 / ep.rate_cap)
        return max(rates, default=0.0)

    def _budget_room(self, k: int, est_tokens: int, est_pico: int) -> int:
        if self.budget_stop or not k:
            return 0
        room, limit = k, None
        if self.max_pico is not None and est_pico > 0:
            fits = max(0, self.max_pico - self.spent_pico - self.reserved_pico) // est_pico
            if fits < room:
                room = fits
                limit = (
                    f"max_cost_usd {self.max_cost_usd} reached "
                    f"(spent {from_pico(self.spent_pico):.4f})"
                )
        if self.max_tokens is not None and est_tokens > 0:
            fits = max(0, self.max_tokens - self.spent_tokens - self.reserved_tokens) // est_tokens
            if fits < room:
                room, limit = (
                    fits,
                    f"max_tokens {self.max_tokens} reached (spent {self.spent_tokens})",
                )
        # Requests in flight may cost less than reserved and give budget back: stop only
        # when none is left to come back.
        if room == 0 and limit and self.reserved_pico == 0 and self.reserved_tokens == 0:
            self.budget_stop = limit
        return room

    def settle(
        self,
        endpoint: str,
        reserved_tokens: int,
        reserved_pico: int,
        tokens: int,
        pico: int,
        counters: dict[str, int] | None = None,
        rate_tokens: int = 0,
        ok: int = 0,
    ) -> float:
        """Give back reservations (`reserved_*`), add what was really used (`tokens`, `pico`
        pico-dollars) and progress counters. `rate_tokens`: tokens sent beyond what the TPM
        schedule counted for their slots; they push the endpoint's timeline on. `ok`: answers
        that were no 429 (``outcomes``). Returns the pause in force on the endpoint."""
        self.reserved_tokens = max(0, self.reserved_tokens - reserved_tokens)
        self.reserved_pico = max(0, self.reserved_pico - reserved_pico)
        self.spent_tokens += tokens
        self.spent_pico += pico
        if counters:
            self.counters.update(counters)
        ep = self.endpoints[endpoint]
        if rate_tokens and ep.tpm:
            ep.next_free += 60.0 * rate_tokens / ep.tpm
        if ok:
            return self.outcomes(endpoint, ok, 0, None)
        return max(0.0, ep.paused_until - self.clock())

    # ------------------------------------------------------------------ 429s and storms
    def outcomes(
        self, endpoint: str, ok: int, rate_limited: int, retry_after_s: float | None
    ) -> float:
        """Record responses; on a storm pause the pool and lower its rate. Returns the pause
        (seconds from now) in force on the endpoint."""
        now = self.clock()
        ep = self.endpoints[endpoint]
        ep.events.extend([(now, False)] * ok + [(now, True)] * rate_limited)
        while ep.events and ep.events[0][0] < now - self.storm_window_s:
            ep.events.popleft()
        n = len(ep.events)
        n429 = sum(1 for _, r in ep.events if r)
        span = now - ep.events[0][0] if ep.events else 0.0
        storm = (
            self.storm_share is not None
            and rate_limited
            and n >= MIN_STORM_EVENTS
            and span >= MIN_STORM_SPAN_S
            and n429 / n >= self.storm_share
            and now >= ep.paused_until
        )
        if storm:
            self.storms += 1
            ep.paused_until = now + (retry_after_s if retry_after_s is not None else 1.0)
            # Lower the rate to what the server accepted, but to no less than a quarter of what
            # was attempted (a short window can undercount what gets through); repeated storms
            # keep lowering it until 429s are sporadic.
            accepted, attempted = (n - n429) / span, n / span
            current = min(ep.rate_cap or attempted, attempted)
            ep.rate_cap = max(accepted, current / 4, 1.0)
            ep.events.clear()
        elif ep.rate_cap and n and n429 == 0 and now - ep.events[0][0] >= self.storm_window_s / 2:
            ep.rate_cap *= 1.25  # a quiet half-window: recover towards the configured limit
            if ep.rpm and ep.rate_cap >= ep.rpm / 60:
                ep.rate_cap = None
            ep.events.clear()
        return max(0.0, ep.paused_until - now)

    def snapshot(self) -> dict[str, Any]:
        elapsed = max(self.clock() - self.started, 1e-9)
        c = self.counters
        return {
            "elapsed_s": elapsed,
            "rows_done": c["rows_done"],
            "rows_per_s": c["rows_done"] / elapsed,
            "calls": c["calls"],
            "cache_hits": c["cache_hits"],
            "errors": c["errors"],
            "rate_limited": c["rate_limited"],
            "storms": self.storms,
            "over_estimate": c["over_estimate"],
            "tokens": self.spent_tokens,
            "cost_usd": from_pico(self.spent_pico),
            "budget_stop": self.budget_stop,
        }


class LeaseGate:
    """Per-actor side of the quota: hands out start slots and budget from leases (one lease
    request in flight at a time) and reports outcomes, spend and progress back in batches.

    A request takes one slot and its own estimate from the gate's reserved budget
    (``acquire``); it gives the estimate back with what it really used once it has ended
    (``release``). Budget a lease reserved for more requests than came stays with the gate
    as spare; when the budget runs short, spare budget too small for the waiting request, and
    all of it at the end, goes back to the quota."""

    def __init__(self, quota: Any, endpoint: str, lease_size: int):
        self.quota = quota  # a Quota, or a Ray actor handle running one
        self.endpoint = endpoint
        self.lease_size = lease_size
        # Start times, each with the tokens the TPM schedule counted for it.
        self._slots: deque[tuple[float, int]] = deque()
        self._spare_tokens = 0  # budget reserved at the quota for this gate, not yet taken
        self._spare_pico = 0
        self._lock = asyncio.Lock()
        self._paused_until = 0.0
        self._stop: str | None = None
        self._tight = False
        self._ok = 0
        self._n429 = 0
        self._retry_after: float | None = None
        self._reporting = False
        # Pending for the next settle: reservations given back, real use, extra TPM tokens.
        self._back_tokens = 0
        self._back_pico = 0
        self._tokens = 0
        self._pico = 0
        self._rate_tokens = 0
        self._counters: Counter[str] = Counter()

    def bind(self, est: Estimate) -> BoundGate:
        """The gate as one request sees it: every attempt of that request reserves `est`."""
        return BoundGate(self, est)

    async def _call(self, method: str, *args: Any) -> Any:
        target = getattr(self.quota, method)
        if hasattr(target, "remote"):
            return await target.remote(*args)
        return target(*args)

    def _covered(self, tokens: int, pico: int) -> bool:
        return bool(self._slots) and self._spare_tokens >= tokens and self._spare_pico >= pico

    async def acquire(self, est: Estimate) -> None:
        """Wait for a start slot with `est` reserved; raise BudgetExhausted when the budget
        cannot cover it any more."""
        pico = to_pico(est.cost)
        async with self._lock:
            while not self._covered(est.tokens, pico):
                if self._stop:
                    raise BudgetExhausted(self._stop)
                # Start slots and budget run out at their own pace (requests differ in size):
                # each is leased `lease_size` at a time, the budget in units of this request.
                # What is pending is settled in the same round trip.
                slots = 0 if self._slots else self.lease_size
                short = self._spare_tokens < est.tokens or self._spare_pico < pico
                units = self.lease_size if short else 0
                lease: Lease = await self._call(
                    "lease", self.endpoint, slots, units, est.tokens, pico, self._take_pending()
                )
                now = time.monotonic()
                self._paused_until = max(self._paused_until, now + lease.paused_for)
                # Already after the pause.
                self._slots.extend((now + d, est.tokens) for d in lease.delays)
                self._spare_tokens += lease.units * est.tokens
                self._spare_pico += lease.units * pico
                self._stop = lease.stop
                self._tight = lease.tight
                if units and not lease.units and not lease.stop:
                    # What is left of the budget is reserved by requests in flight, or is this
                    # gate's spare, too small for this request: give the spare back, wait for
                    # the requests to settle (with their real, usually lower, cost), ask again.
                    self._give_back_spare()
                    await asyncio.sleep(0.05)
            start, counted = self._slots.popleft()
            self._spare_tokens -= est.tokens
            self._spare_pico -= pico
            self._rate_tokens += max(0, est.tokens - counted)
        wait = max(start, self._paused_until) - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def release(self, est: Estimate, tokens: int = 0, cost: float = 0.0, ok: bool = True) -> None:
        """The attempt that reserved `est` has ended; `tokens`/`cost`: what it really used."""
        pico = to_pico(cost)
        self._back_tokens += est.tokens
        self._back_pico += to_pico(est.cost)
        self._tokens += tokens
        self._pico += pico
        self._ok += ok
        if tokens > est.tokens or pico > to_pico(est.cost):
            self._counters["over_estimate"] += 1  # the estimate is no bound: a bug to fix

    def _give_back_spare(self) -> None:
        self._back_tokens += self._spare_tokens
        self._back_pico += self._spare_pico
        self._spare_tokens = self._spare_pico = 0

    async def rate_limited(self, est: Estimate, retry_after_s: float | None) -> None:
        """A 429 ended an attempt: release it and tell the quota now (a storm must pause the
        whole pool quickly), together with the other 429s that arrive meanwhile: one report
        in flight per actor, so a flood of 429s is not a flood of actor calls."""
        self.release(est, ok=False)
        self._counters["rate_limited"] += 1
        self._n429 += 1
        self._retry_after = retry_after_s
        if self._reporting:
            return
        self._reporting = True
        try:
            while self._n429:
                ok, n429, hint = self._ok, self._n429, self._retry_after
                self._ok = self._n429 = 0
                self._pause(await self._call("outcomes", self.endpoint, ok, n429, hint))
        finally:
            self._reporting = False

    def _pause(self, pause: float) -> None:
        """The pool is paused (a storm): slots leased before it were timed for a rate the
        server refuses, so they are dropped and the next attempt leases anew."""
        if pause > 0:
            self._paused_until = max(self._paused_until, time.monotonic() + pause)
            self._slots.clear()

    def count(self, **counters: int) -> None:
        self._counters.update(counters)

    def _take_pending(self) -> tuple | None:
        """``Quota.settle``'s arguments for what is pending (and zero it), or None."""
        pending = (
            self._back_tokens,
            self._back_pico,
            self._tokens,
            self._pico,
            dict(self._counters),
            self._rate_tokens,
            self._ok,
        )
        self._back_tokens = self._back_pico = self._tokens = self._pico = 0
        self._rate_tokens = self._ok = 0
        self._counters = Counter()
        return pending if any(pending) else None

    async def _flush(self) -> None:
        # Taken before awaiting: other requests keep adding to the pending numbers.
        pending = self._take_pending()
        if pending is not None:
            self._pause(await self._call("settle", self.endpoint, *pending))

    async def flush(self) -> None:
        """Report what is pending; when the budget is nearly spent also give back the spare
        budget, so that an idle actor does not sit on budget another one needs."""
        async with self._lock:
            if self._tight:
                self._give_back_spare()
                self._slots.clear()
            await self._flush()

    async def close(self) -> None:
        """Give back the spare budget and report everything pending."""
        async with self._lock:
            self._give_back_spare()
            self._slots.clear()
            await self._flush()


@dataclass
class BoundGate:
    """A LeaseGate bound to one request's estimate: what the teacher client sees
    (``client.Gate``)."""

    gate: LeaseGate
    est: Estimate

    async def acquire(self) -> None:
        await self.gate.acquire(self.est)

    def release(self, tokens: int = 0, cost: float = 0.0, ok: bool = True) -> None:
        self.gate.release(self.est, tokens, cost, ok)

    async def rate_limited(self, retry_after_s: float | None) -> None:
        await self.gate.rate_limited(self.est, retry_after_s)
