"""The simulator's faults and limits over real HTTP, as the openai client and a raw client see
them (`distill teacher-sim` runs as a subprocess; no Ray needed)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import aiohttp
import openai
import pytest
from multidict import CIMultiDict

from ray_pipeline.data import synthetic
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.teacher.client import TeacherClient
from ray_pipeline.teacher.parse import parse_answer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
PROMPT = Prompt(synthetic.PROMPT)


def body(text: str) -> dict:
    return {"model": "sim-teacher", "messages": PROMPT.messages(text), "max_tokens": 32}


async def post_all(url: str, n: int, key: str = "k") -> list[tuple[int, CIMultiDict, bytes]]:
    """`n` sequential chat requests: (status, headers, body) of each."""
    out = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s:
        for i in range(n):
            async with s.post(f"{url}/chat/completions", json=body(f"comment {i}")) as r:
                out.append((r.status, r.headers.copy(), await r.read()))
    return out


async def get_metrics(url: str, reset: bool = False) -> dict:
    base = url.removesuffix("/v1")
    async with aiohttp.ClientSession() as s:
        if reset:
            async with s.post(f"{base}/metrics/reset") as r:
                return await r.json()
        async with s.get(f"{base}/metrics") as r:
            return await r.json()


def openai_client(url: str, key: str = "k", timeout: float = 10.0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=url,
        api_key=key,
        max_retries=0,
        timeout=timeout,
        http_client=openai.DefaultAioHttpClient(timeout=timeout),
    )


def test_injected_429_carries_retry_after(simulator):
    url = simulator(rule="quickstart", rate_429=1, retry_after_s=2)
    status, headers, raw = asyncio.run(post_all(url, 1))[0]
    assert status == 429
    assert headers["retry-after"] == "2" and headers["retry-after-ms"] == "2000"
    assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"

    async def sdk() -> openai.RateLimitError:
        client = openai_client(url)
        try:
            with pytest.raises(openai.RateLimitError) as exc:
                await client.chat.completions.create(**body("x"))
            return exc.value
        finally:
            await client.close()

    err = asyncio.run(sdk())
    assert err.status_code == 429 and err.response.headers["retry-after-ms"] == "2000"


def test_500_and_503_have_openai_error_bodies(simulator):
    url = simulator(rule="quickstart", rate_500=0.5, rate_503=0.5, seed=2)
    replies = asyncio.run(post_all(url, 30))
    assert {s for s, _, _ in replies} == {500, 503}
    for status, headers, raw in replies:
        assert headers["Content-Type"].startswith("application/json")
        error = json.loads(raw)["error"]
        assert error["type"] == "server_error" and error["message"]
        assert error["code"] == ("service_unavailable" if status == 503 else None)


def test_malformed_body_makes_the_openai_client_raise(simulator):
    url = simulator(rule="quickstart", rate_malformed=1)
    replies = asyncio.run(post_all(url, 2))
    for status, _, raw in replies:  # a proxy page and a truncated completion
        assert status == 200
        with pytest.raises(ValueError):
            json.loads(raw)
    assert any(raw.startswith(b'{"id":"chatcmpl-') for _, _, raw in replies)

    async def sdk() -> None:
        client = openai_client(url)
        try:
            for i in range(2):
                with pytest.raises(ValueError):  # json.JSONDecodeError from the SDK
                    await client.chat.completions.create(**body(f"x{i}"))
        finally:
            await client.close()

    asyncio.run(sdk())
    m = asyncio.run(get_metrics(url))
    assert m["faults"]["malformed"] == 4 and m["ok"] == 0 and m["status"] == {"200": 4}


def test_unparsable_answer_is_a_200_with_nothing_to_parse(simulator):
    url = simulator(rule="quickstart", rate_unparsable=1)

    async def sdk() -> str:
        client = openai_client(url)
        try:
            resp = await client.chat.completions.create(**body("you absolute clown"))
            return resp.choices[0].message.content
        finally:
            await client.close()

    parsed = parse_answer(asyncio.run(sdk()), "toxic", ["0", "1"], {})
    assert parsed.label is None and parsed.error.startswith("parse_error")


def test_a_hang_exceeds_a_short_client_timeout(simulator):
    url = simulator(rule="quickstart", rate_hang=1, hang_s=30)

    async def sdk() -> float:
        client = openai_client(url, timeout=0.5)
        started = time.monotonic()
        try:
            with pytest.raises(openai.APITimeoutError):
                await client.chat.completions.create(**body("x"))
            return time.monotonic() - started
        finally:
            await client.close()

    assert asyncio.run(sdk()) < 5
    m = asyncio.run(get_metrics(url))
    assert m["faults"]["hang"] == 1 and m["in_flight"] == 1  # still hanging on the server


def test_per_key_rpm_limit(simulator):
    url = simulator(rule="quickstart", rpm_per_key=60, rpm_burst=3)

    async def run() -> tuple[list, list]:
        return await post_all(url, 5, key="team-a"), await post_all(url, 2, key="team-b")

    team_a, team_b = asyncio.run(run())
    assert [s for s, _, _ in team_a] == [200, 200, 200, 429, 429]
    for _, headers, raw in team_a[3:]:
        assert headers["retry-after"] == "1" and 0 < int(headers["retry-after-ms"]) <= 1000
        assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
    assert [s for s, _, _ in team_b] == [200, 200]  # another key has its own budget
    m = asyncio.run(get_metrics(url))
    assert m["rate_limited"] == 2 and m["status"] == {"200": 5, "429": 2}


def test_metrics_match_what_was_sent_and_reset(simulator):
    settings = {
        "rule": "quickstart",
        "seed": 5,
        "latency_ms": 2,
        "latency_dist": "lognormal",
        "rate_429": 0.2,
        "rate_500": 0.1,
        "rate_503": 0.1,
        "rate_unparsable": 0.1,
    }
    url = simulator(**settings)
    replies = asyncio.run(post_all(url, 80))
    m = asyncio.run(get_metrics(url))
    statuses = Counter(s for s, _, _ in replies)
    assert m["requests"] == 80 and m["ok"] == statuses[200] and m["in_flight"] == 0
    assert m["status"] == {str(s): n for s, n in sorted(statuses.items())}
    assert (
        m["faults"]["rate_limit"] == statuses[429] and m["faults"]["server_error"] == statuses[500]
    )
    assert m["faults"]["unavailable"] == statuses[503] and m["faults"]["hang"] == 0
    oks = [json.loads(raw) for s, _, raw in replies if s == 200]
    unparsable = sum(
        parse_answer(b["choices"][0]["message"]["content"], "toxic", ["0", "1"], {}).error
        is not None
        for b in oks
    )
    assert unparsable == m["faults"]["unparsable"] > 0
    assert m["prompt_tokens"] == sum(b["usage"]["prompt_tokens"] for b in oks)
    assert m["completion_tokens"] == sum(b["usage"]["completion_tokens"] for b in oks)
    # The same seed serves the same sequence of faults.
    again = simulator(**settings)
    assert [s for s, _, _ in asyncio.run(post_all(again, 80))] == [s for s, _, _ in replies]
    reset = asyncio.run(get_metrics(url, reset=True))
    assert reset["requests"] == reset["ok"] == reset["total_tokens"] == 0 and reset["status"] == {}


def test_the_teacher_client_retries_through_transient_faults(simulator):
    url = simulator(
        rule="quickstart", error_rate=0, rate_429=0.3, retry_after_s=0, rate_500=0.2, rate_503=0.1
    )

    async def run() -> list:
        client = TeacherClient(
            url, "sim-teacher", "k", max_attempts=30, backoff_base_s=0.001, backoff_max_s=0.01
        )
        try:
            return await asyncio.gather(
                *(client.complete(PROMPT.messages(f"comment {i}")) for i in range(20))
            )
        finally:
            await client.aclose()

    replies = asyncio.run(run())
    assert all(parse_answer(r.texts[0], "toxic", ["0", "1"], {}).label is not None for r in replies)
    assert max(r.attempts for r in replies) > 1  # retries of the same request got through
    m = asyncio.run(get_metrics(url))
    assert m["requests"] == sum(r.attempts for r in replies) and m["ok"] == 20
