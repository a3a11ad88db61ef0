"""The real openai client against the real simulator server, over HTTP (no Ray needed)."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request

import pytest

from ray_pipeline.data import synthetic
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.teacher.client import TeacherCallError, TeacherClient
from ray_pipeline.teacher.parse import parse_answer

pytestmark = pytest.mark.integration
PROMPT = Prompt(synthetic.PROMPT)


async def _complete(url, messages, **kw):
    client = TeacherClient(url, "sim-teacher", "k", **kw)
    try:
        return await client.complete(messages, temperature=0, max_tokens=32)
    finally:
        await client.aclose()


def test_chat_completion_with_usage(simulator):
    url = simulator(rule="quickstart", error_rate=0, latency_ms=5)
    reply = asyncio.run(_complete(url, PROMPT.messages("what a clown")))
    assert parse_answer(reply.texts[0], "toxic", ["0", "1"], {}).label == "1"
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0 and reply.attempts == 1
    models = json.load(urllib.request.urlopen(url + "/models"))
    assert models["data"][0]["id"] == "sim-teacher"
    counts = json.load(urllib.request.urlopen(url.removesuffix("/v1") + "/metrics"))
    assert counts["ok"] == 1 and counts["rule"] == 1


def test_unknown_input_is_a_4xx_that_is_not_retried(simulator):
    url = simulator()  # no rule, no replay: every input is unknown
    with pytest.raises(TeacherCallError) as exc:
        asyncio.run(_complete(url, [{"role": "user", "content": "hi"}], max_attempts=4))
    assert exc.value.status_code == 404 and exc.value.attempts == 1
    assert "no recorded response" in str(exc.value)


def test_connection_errors_are_retried_then_fail():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TeacherCallError) as exc:
        asyncio.run(
            _complete(
                f"http://127.0.0.1:{port}/v1",
                [{"role": "user", "content": "x"}],
                max_attempts=3,
                backoff_base_s=0.01,
            )
        )
    assert exc.value.attempts == 3 and exc.value.status_code is None
    # The aiohttp transport reports a refused connection as a connect timeout.
    assert exc.value.error_class in {"APIConnectionError", "APITimeoutError"}
