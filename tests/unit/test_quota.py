from __future__ import annotations

import asyncio

import pytest

from ray_pipeline.teacher.quota import PICO, BudgetExhausted, Estimate, LeaseGate, Quota, to_pico


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rpm_schedule_spaces_requests_across_leases():
    clock = Clock()
    q = Quota({"e": {"rpm": 600}}, burst_s=0.0, clock=clock)  # 10 requests/s
    a = q.lease("e", 3, 3, 10, 0)
    b = q.lease("e", 2, 2, 10, 0)  # another actor: continues the same timeline
    starts = a.delays + b.delays
    assert starts == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    clock.t += 10  # idle time is not banked beyond the burst
    assert q.lease("e", 2, 2, 10, 0).delays == pytest.approx([0.0, 0.1])


def test_burst_allows_one_second_at_once():
    q = Quota({"e": {"rpm": 600}}, burst_s=1.0, clock=Clock())
    delays = q.lease("e", 12, 12, 1, 0).delays
    assert delays[:10] == pytest.approx([0.0] * 10) and delays[10] == pytest.approx(0.1)


def test_tpm_limits_by_estimated_tokens():
    q = Quota({"e": {"rpm": None, "tpm": 6000}}, burst_s=0.0, clock=Clock())  # 100 tokens/s
    assert q.lease("e", 3, 3, 50, 0).delays == pytest.approx([0.0, 0.5, 1.0])


def test_no_limits_means_no_waiting():
    q = Quota({"e": {}}, clock=Clock())
    assert q.lease("e", 5, 5, 100, 0).delays == [0.0] * 5


def test_no_storm_without_evidence_or_when_disabled():
    clock = Clock()
    q = Quota({"e": {}}, clock=clock)
    assert q.outcomes("e", 0, 50, 1.0) == 0.0  # 50 429s in no time: too little to judge
    off = Quota({"e": {}}, storm_share=None, clock=clock)
    off.outcomes("e", 0, 10, 1.0)
    clock.t += 1
    assert off.outcomes("e", 0, 100, 1.0) == 0.0 and off.storms == 0


def test_budget_reserves_and_stops_once_nothing_can_come_back():
    q = Quota({"e": {}}, max_cost_usd=1.0, clock=Clock())
    c3 = to_pico(0.3)
    first = q.lease("e", 3, 3, 10, c3)
    assert first.units == 3 and len(first.delays) == 3 and first.stop is None and not first.tight
    second = q.lease("e", 3, 3, 10, c3)  # 0.9 reserved: nothing more fits for now
    assert second.units == 0 and second.delays == [] and second.stop is None and second.tight
    q.settle("e", 30, 3 * c3, 30, to_pico(0.3), {"rows_done": 3})  # cheaper than reserved
    third = q.lease("e", 3, 3, 10, c3)
    assert third.units == 2 and third.tight  # 0.7 left: two more fit
    q.settle("e", 20, 2 * c3, 20, to_pico(0.6), {"rows_done": 2})
    last = q.lease("e", 3, 3, 10, c3)  # 0.1 left, nothing in flight: the budget is spent
    assert last.units == 0 and "max_cost_usd 1.0 reached (spent 0.9000)" in last.stop
    snap = q.snapshot()
    assert snap["cost_usd"] == 0.9 and snap["rows_done"] == 5 and snap["budget_stop"]


def test_token_budget():
    q = Quota({"e": {}}, max_tokens=250, clock=Clock())
    assert q.lease("e", 5, 5, 100, 0).units == 2
    q.settle("e", 200, 0, 200, 0)
    assert (
        q.lease("e", 5, 5, 100, 0).units == 0
        and "max_tokens 250 reached" in q.snapshot()["budget_stop"]
    )


def test_costs_add_up_exactly_in_any_order():
    # Floats would drift (0.1 + 0.2 != 0.3); whole pico-dollars do not.
    q = Quota({"e": {}}, clock=Clock())
    costs = [0.1, 0.2, 0.3, 1e-7, 0.123456789012]
    for c in costs:
        q.settle("e", 0, 0, 1, to_pico(c))
    assert q.snapshot()["cost_usd"] * PICO == sum(to_pico(c) for c in reversed(costs))


def test_tokens_beyond_a_slots_count_push_the_tpm_schedule():
    q = Quota({"e": {"tpm": 6000}}, burst_s=0.0, clock=Clock())  # 100 tokens/s
    assert q.lease("e", 1, 1, 50, 0).delays == pytest.approx([0.0])
    q.settle("e", 0, 0, 0, 0, rate_tokens=100)  # a 150-token request went in a 50-token slot
    assert q.lease("e", 1, 1, 50, 0).delays == pytest.approx([1.5])


def test_sporadic_429s_do_not_pause_but_a_storm_does():
    clock = Clock()
    q = Quota({"e": {"rpm": 6000}}, storm_share=0.3, storm_window_s=5.0, burst_s=0.0, clock=clock)
    assert q.outcomes("e", 90, 0, None) == 0.0
    clock.t += 2
    assert q.outcomes("e", 0, 10, 1.0) == 0.0  # 10% of the window: only those requests wait
    pause = q.outcomes("e", 0, 40, 2.0)  # 50 of 140 in 2 s: a storm
    assert pause == pytest.approx(2.0) and q.storms == 1
    lease = q.lease("e", 2, 2, 1, 0)
    assert lease.paused_for == pytest.approx(2.0) and min(lease.delays) >= 2.0
    # 90 accepted, 140 attempted in 2 s: the rate goes to max(accepted 45/s, 70/s / 4).
    assert q.endpoints["e"].rate_cap == pytest.approx(45.0)
    assert q.outcomes("e", 0, 5, 1.0) == pytest.approx(2.0)  # no second storm during the pause


def test_repeated_storms_lower_the_rate_then_quiet_windows_recover_it():
    clock = Clock()
    q = Quota({"e": {"rpm": 600}}, storm_share=0.3, storm_window_s=4.0, clock=clock)
    q.outcomes("e", 10, 0, None)
    clock.t += 1
    q.outcomes("e", 0, 90, 0.5)  # 100 attempted/s, 10 accepted/s
    assert q.endpoints["e"].rate_cap == pytest.approx(25.0)
    clock.t += 1
    q.outcomes("e", 10, 0, None)
    clock.t += 1
    q.outcomes("e", 0, 40, 0.5)  # 50 attempted/s, still 10 accepted/s
    assert q.endpoints["e"].rate_cap == pytest.approx(10.0) and q.storms == 2  # what got through
    for _ in range(4):  # quiet half-windows
        q.outcomes("e", 5, 0, None)
        clock.t += 2.5
        q.outcomes("e", 5, 0, None)
    assert q.endpoints["e"].rate_cap is None  # back at the configured 10/s


def test_gate_reserves_each_requests_own_estimate():
    q = Quota({"e": {}}, max_cost_usd=1.0, clock=Clock())
    small, big = Estimate(10, 0.01), Estimate(1000, 0.2)

    async def main():
        gate = LeaseGate(q, "e", lease_size=4)
        await gate.acquire(small)  # one lease: 4 slots with a small request's reservation each
        assert q.reserved_pico == to_pico(0.04) and q.reserved_tokens == 40
        # The spare 0.03 cannot cover it: budget for 4 more of its size (slots are left).
        await gate.acquire(big)
        assert q.reserved_pico == to_pico(0.04 + 0.8) and q.reserved_tokens == 4040
        gate.release(small, tokens=7, cost=0.005)
        gate.release(big, tokens=900, cost=0.15)
        gate.count(rows_done=2, calls=2)
        await gate.flush()
        # Real use is spent; the two requests' reservations are back; the spare stays held.
        assert q.spent_pico == to_pico(0.155) and q.spent_tokens == 907
        assert q.reserved_pico == to_pico(0.63) and q.reserved_tokens == 3030
        await gate.close()  # the spare goes back
        assert q.reserved_pico == 0 and q.reserved_tokens == 0
        assert q.snapshot()["calls"] == 2 and q.snapshot()["over_estimate"] == 0

    asyncio.run(main())


def test_gate_counts_requests_that_used_more_than_reserved():
    q = Quota({"e": {}}, clock=Clock())

    async def main():
        gate = LeaseGate(q, "e", lease_size=2)
        est = Estimate(10, 0)
        await gate.acquire(est)
        gate.release(est, tokens=11)
        await gate.close()
        assert q.snapshot()["over_estimate"] == 1

    asyncio.run(main())


def test_gate_gives_its_spare_back_when_a_big_request_does_not_fit():
    """The spare budget of small leases must not block a big request forever: the gate gives
    it back, and the budget stops cleanly once nothing else is in flight."""
    q = Quota({"e": {}}, max_cost_usd=1.0, clock=Clock())

    async def main():
        gate = LeaseGate(q, "e", lease_size=4)
        small = Estimate(1, 0.2)
        await gate.acquire(small)  # 0.8 reserved for 4 small requests
        gate.release(small, tokens=1, cost=0.2)  # the first one cost what it reserved
        with pytest.raises(BudgetExhausted, match="max_cost_usd"):
            await gate.acquire(Estimate(1, 0.9))  # 0.8 left in all: it can never fit
        assert q.reserved_pico == 0 and q.spent_pico == to_pico(0.2)

    asyncio.run(main())


def test_gate_raises_when_the_budget_is_spent():
    q = Quota({"e": {}}, max_cost_usd=0.25, clock=Clock())

    async def main():
        gate = LeaseGate(q, "e", lease_size=4)
        est = Estimate(10, 0.1)
        await gate.acquire(est)
        await gate.acquire(est)
        gate.release(est, 10, 0.1)
        gate.release(est, 10, 0.1)
        with pytest.raises(BudgetExhausted, match="max_cost_usd"):
            await gate.acquire(est)

    asyncio.run(main())


def test_a_lease_without_budget_for_its_request_spends_no_rate():
    clock = Clock()
    q = Quota({"e": {"rpm": 600}}, max_cost_usd=0.1, burst_s=0.0, clock=clock)
    assert len(q.lease("e", 1, 1, 1, to_pico(0.1)).delays) == 1  # the whole budget, in flight
    waiting = q.lease("e", 4, 4, 1, to_pico(0.05))
    assert waiting.delays == [] and waiting.units == 0 and waiting.tight and not waiting.stop
    q.settle("e", 1, to_pico(0.1), 1, to_pico(0.02))
    later = q.lease("e", 1, 4, 1, to_pico(0.05))  # one slot, budget for as many as fit
    assert later.units == 1 and later.delays == pytest.approx([0.1])  # the timeline moved on once
