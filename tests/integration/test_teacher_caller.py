"""TeacherCaller (the generate stage's actor logic) against the real simulator over HTTP,
without Ray: cache, budget, voters and samples, every input accounted for."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from ray_pipeline.config import TaskSection, TeacherSection
from ray_pipeline.data import synthetic
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.data.schema import FAILED, OK, dumps, new_row, row_id
from ray_pipeline.teacher.caller import TeacherCaller, TeacherEndpoint, ask_specs
from ray_pipeline.teacher.parse import parse_rows
from ray_pipeline.teacher.quota import Quota, from_pico, to_pico
from ray_pipeline.train.soft_targets import label_distribution

pytestmark = pytest.mark.integration
PROMPT = Prompt(synthetic.PROMPT)
TASK = TaskSection.model_validate(synthetic.TASK)
SIM = "simulator:test"  # the endpoint's identity in the cache and the quota


def rows(n, seed=0):
    return [
        new_row(
            id=row_id("t", text),
            source="t",
            source_line=i,
            input=text,
            messages=dumps(PROMPT.messages(text)),
        )
        for i, text in enumerate(synthetic.generate_comments(n, seed))
    ]


def metrics(url):
    return json.load(urllib.request.urlopen(url.removesuffix("/v1") + "/metrics"))


def run_caller(url, teacher: dict, batch, quota=None, cache_dir=None):
    cfg = TeacherSection.model_validate({"simulator": {"enabled": True}, **teacher})
    # As the generate stage asks: the rows' answers with logprobs when configured.
    specs = ask_specs(cfg, TeacherEndpoint(url, "k", SIM), cfg.logprob_params())
    caller = TeacherCaller(specs, cfg.model_dump(mode="json"), quota, cache_dir)

    async def go():
        try:
            return await caller.call_rows(batch)
        finally:
            await caller.aclose()

    return asyncio.run(go())


def test_every_row_answered_and_cached(simulator, tmp_path):
    url = simulator(rule="quickstart")
    out = parse_rows(
        run_caller(
            url,
            {"per_actor_concurrency": 8},
            rows(40),
            Quota({SIM: {}}),
            str(tmp_path / "cache"),
        ),
        TASK,
    )
    assert [r["status"] for r in out] == [OK] * 40
    assert all(
        r["label"] in ("0", "1")
        and r["prompt_tokens"] > 0
        and r["attempts"] == 1
        and not r["cached"]
        for r in out
    )
    sent = metrics(url)["ok"]
    again = run_caller(url, {}, rows(40), Quota({SIM: {}}), str(tmp_path / "cache"))
    assert metrics(url)["ok"] == sent == 40  # the re-run made zero calls
    assert all(r["cached"] and r["cost"] == 0.0 for r in again)
    assert [r["response"] for r in again] == [r["response"] for r in out]


def test_logprobs_are_kept_per_row_and_cached_apart_from_plain_answers(simulator, tmp_path):
    url = simulator(rule="quickstart", error_rate=0.3)
    cache = str(tmp_path / "cache")
    plain = run_caller(url, {}, rows(12), cache_dir=cache)
    assert all(r["teacher_logprobs"] is None for r in plain)
    asked = parse_rows(run_caller(url, {"top_logprobs": 2}, rows(12), cache_dir=cache), TASK)
    # The plain answers in the cache do not serve requests that want logprobs.
    assert metrics(url)["ok"] == 24 and not any(r["cached"] for r in asked)
    for r in asked:
        logprobs = json.loads(r["teacher_logprobs"])
        assert "".join(t["token"] for t in logprobs) == r["response"]
        assert all(list(t) == ["token", "logprob", "top"] and len(t["top"]) <= 2 for t in logprobs)
        probs = label_distribution(logprobs, TASK.labels)
        assert max(probs) == probs[TASK.labels.index(r["label"])]
        assert sum(probs) == pytest.approx(1.0)
    again = run_caller(url, {"top_logprobs": 2}, rows(12), cache_dir=cache)
    assert metrics(url)["ok"] == 24 and all(r["cached"] for r in again)  # no new call
    assert [r["teacher_logprobs"] for r in again] == [r["teacher_logprobs"] for r in asked]
    # Only the main teacher's row requests ask; voters do not.
    cfg = TeacherSection.model_validate(
        {"simulator": {"enabled": True}, "top_logprobs": 2, "voters": [{"name": "v"}]}
    )
    main, voter = ask_specs(cfg, TeacherEndpoint(url, "k", SIM), cfg.logprob_params())
    assert main.params["top_logprobs"] == 2 and main.params["logprobs"] is True
    assert "logprobs" not in voter.params and "top_logprobs" not in voter.params


def test_budget_stops_cleanly_and_accounts_every_row(simulator):
    url = simulator(rule="quickstart")
    quota = Quota({SIM: {}}, max_cost_usd=0.01)
    teacher = {
        "model": "sim-teacher",
        "max_tokens": 10,
        "per_actor_concurrency": 4,
        "rate_limit": {"lease_size": 2},
        "prices": {"sim-teacher": {"input_per_mtok": 100.0, "output_per_mtok": 100.0}},
    }
    out = run_caller(url, teacher, rows(60), quota)
    ok = [r for r in out if r["status"] == OK]
    refused = [r for r in out if r["status"] == FAILED]
    assert len(ok) + len(refused) == 60 and ok and refused
    assert all(r["reason"].startswith("budget_exhausted: max_cost_usd 0.01") for r in refused)
    spent = quota.snapshot()["cost_usd"]
    assert spent <= 0.01 and metrics(url)["ok"] == len(ok)
    assert from_pico(sum(to_pico(r["cost"]) for r in out)) == spent  # exactly


def test_voters_and_samples_fill_votes(simulator):
    url = simulator(rule="quickstart", error_rate=0.3)
    teacher = {
        "n": 3,
        "temperature": 0.7,
        "voters": [
            {"name": "strict", "prompt": {"template": "Strictly: " + synthetic.PROMPT}, "n": 2}
        ],
    }
    out = parse_rows(run_caller(url, teacher, rows(5)), TASK)
    for r in out:
        votes = json.loads(r["votes"])
        assert [(v["teacher"], v["sample"]) for v in votes] == [
            ("main", 0),
            ("main", 1),
            ("main", 2),
            ("strict", 0),
            ("strict", 1),
        ]
        assert all(v["label"] in ("0", "1") for v in votes)
        assert r["label"] == votes[0]["label"]
    assert metrics(url)["ok"] == 10  # one request per teacher per row, n samples each


def test_reservations_cover_what_each_request_uses_and_every_cent_reaches_a_row(simulator):
    """Rows from a few characters to a few thousand, a voter with n=3 on its own (longer)
    prompt, a 500 on a third of the requests without retries (so some rows lose their main
    answer but keep their voter's): no request may use more than it reserved, the budget
    holds, and the rows' costs add up to the quota's spend exactly."""
    url = simulator(rule="quickstart", rate_500=0.3, seed=4)
    texts = [t * k for k, t in enumerate(synthetic.generate_comments(40, seed=5), 1)]
    texts += ["ok", "x" * 6000]
    batch = [
        new_row(id=row_id("t", t), source="t", input=t, messages=dumps(PROMPT.messages(t)))
        for t in texts
    ]
    teacher = {
        "model": "sim-teacher",
        "max_tokens": 24,
        "max_attempts": 1,
        "per_actor_concurrency": 8,
        "rate_limit": {"lease_size": 4},
        "prices": {"sim-teacher": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}},
        "voters": [
            {
                "name": "careful",
                "n": 3,
                "temperature": 0.7,
                "prompt": {"template": "Think it over, then answer. " + synthetic.PROMPT},
            }
        ],
    }
    quota = Quota({SIM: {}}, max_cost_usd=0.05)
    out = run_caller(url, teacher, batch, quota)
    snap = quota.snapshot()
    assert snap["over_estimate"] == 0  # every request used at most what it reserved
    assert snap["budget_stop"] and 0 < snap["cost_usd"] <= 0.05  # stopped, within budget
    assert any(r["reason"] and r["reason"].startswith("budget_exhausted") for r in out)
    assert from_pico(sum(to_pico(r["cost"]) for r in out)) == snap["cost_usd"]
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in out) == snap["tokens"]
    m = metrics(url)
    assert snap["tokens"] == m["total_tokens"]  # what the server counted, to the token
    # Rows whose main request failed still carry what their voter's answers cost.
    voted_only = [
        r for r in out if r["reason"] and r["reason"].startswith("teacher_error") and r["cost"]
    ]
    assert voted_only and all(r["completion_tokens"] > 0 for r in voted_only)
