from __future__ import annotations

import json
import math
import statistics

import pytest
from openai.types.chat import ChatCompletion

from ray_pipeline.config import ConfigError, SeedsSection, load_config
from ray_pipeline.data import synthetic
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.teacher.client import token_logprobs
from ray_pipeline.teacher.parse import parse_answer, parse_list
from ray_pipeline.teacher.simulator import (
    FAULT_KINDS,
    SURE_REST,
    RpmLimiter,
    Simulator,
    count_prompt_tokens,
    label_confidence,
    load_replay,
    simulator_identity,
)
from ray_pipeline.train.soft_targets import label_distribution

PROMPT = Prompt(synthetic.PROMPT)


def config(task=synthetic.TASK, seeds=False, **settings):
    """A run config whose teacher.simulator section holds `settings`."""
    data = {"logs": [{"path": "x.jsonl"}]}
    if seeds:
        data["seeds"] = {"path": "s.jsonl"}
    return load_config(
        data={
            "task": task,
            "teacher": {"model": "sim-teacher", "simulator": {"enabled": True, **settings}},
            "data": data,
        }
    )


def make(clock=None, **settings) -> Simulator:
    cfg = config(**settings)
    return Simulator(cfg) if clock is None else Simulator(cfg, clock)


def ask(sim, text, **body):
    return sim.answer({"model": "m", "messages": PROMPT.messages(text), **body})


def test_rule_answers_follow_the_rule_with_errors():
    sim = make(rule="quickstart", error_rate=0.0)
    status, body = ask(sim, "You are a moron")
    assert status == 200
    assert (
        parse_answer(body["choices"][0]["message"]["content"], "toxic", ["0", "1"], {}).label == "1"
    )
    assert (
        body["usage"]["total_tokens"]
        == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        > 0
    )
    status, body = ask(sim, "This article is fine", n=3)
    assert [
        parse_answer(c["message"]["content"], "toxic", ["0", "1"], {}).label
        for c in body["choices"]
    ] == ["0"] * 3


def test_replay_by_input_text(jigsaw_dir):
    table = load_replay(
        jigsaw_dir / "test.balanced.gpt-4.responses.csv", "comment_text", "simple_prompt"
    )
    assert len(table) == 400
    prompt_file = jigsaw_dir / "prompt.simple.txt"
    prompt = Prompt(prompt_file.read_text(), "%s")
    task = {"prompt": {"file": str(prompt_file), "placeholder": "%s"}, "labels": ["0", "1"]}
    replay = [{"path": str(jigsaw_dir / "test.balanced.gpt-4.responses.csv")}]
    sim = make(task=task, replay=replay)
    comment, recorded = next(iter(table.items()))
    status, body = sim.answer({"messages": prompt.messages(comment)})
    assert status == 200 and body["choices"][0]["message"]["content"] == recorded
    status, body = sim.answer({"messages": prompt.messages("never seen")})
    assert status == 404 and "no recorded response" in body["error"]["message"]


def test_every_jigsaw_responses_file_loads_as_a_replay_table(jigsaw_dir):
    for path in sorted(jigsaw_dir.glob("*.responses.csv")):
        assert load_replay(path, "comment_text", "simple_prompt"), path


def test_bad_requests_are_400():
    sim = make(rule="quickstart")
    assert sim.answer({"messages": []})[0] == 400
    assert sim.answer({"messages": [{"role": "assistant", "content": "x"}]})[0] == 400
    assert sim.answer({"messages": PROMPT.messages("x"), "n": 99})[0] == 400


def test_seed_expansion_requests():
    tmpl = SeedsSection(path="s.jsonl").template
    sim = make(rule="quickstart", seeds=True)
    prompt = tmpl.format(task="toxicity", examples="- a\n- b", n=7)
    status, body = sim.answer({"messages": [{"role": "user", "content": prompt}], "seed": 1})
    items = parse_list(body["choices"][0]["message"]["content"])
    assert status == 200 and len(items) == 7 and len(set(items)) == 7
    _, again = sim.answer({"messages": [{"role": "user", "content": prompt}], "seed": 2})
    assert json.loads(again["choices"][0]["message"]["content"]) != items  # a new seed, new inputs


# ----------------------------------------------------------------------- faults and limits
def raw(text: str, **body) -> bytes:
    return json.dumps({"model": "m", "messages": PROMPT.messages(text), **body}).encode()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def faulty(**kw) -> Simulator:
    return make(rule="quickstart", error_rate=0.0, **kw)


def test_every_fault_kind_at_its_rate():
    rates = dict(
        rate_429=0.05,
        rate_500=0.10,
        rate_503=0.05,
        rate_hang=0.02,
        rate_malformed=0.08,
        rate_unparsable=0.10,
    )
    sim = faulty(seed=7, hang_s=99.0, latency_ms=20, **rates)
    n = 20_000
    seen = {kind: 0 for kind in FAULT_KINDS}
    for i in range(n):
        r = sim.reply(raw(f"comment {i}"))
        if r.fault is None:
            assert r.status == 200 and r.delay_s == 0.02
            parsed = parse_answer(
                json.loads(r.body)["choices"][0]["message"]["content"], "toxic", ["0", "1"], {}
            )
            assert parsed.error is None
            continue
        seen[r.fault] += 1
        if r.fault == "rate_limit":
            assert r.status == 429 and r.delay_s == 0.0
        elif r.fault == "server_error":
            assert r.status == 500 and json.loads(r.body)["error"]["type"] == "server_error"
        elif r.fault == "unavailable":
            assert r.status == 503 and json.loads(r.body)["error"]["code"] == "service_unavailable"
        elif r.fault == "hang":
            assert r.status == 200 and r.delay_s == 99.0 and json.loads(r.body)["choices"]
        elif r.fault == "malformed":
            assert r.status == 200
            with pytest.raises(ValueError):
                json.loads(r.body)
        else:  # unparsable: a well-formed completion whose answer has nothing to parse
            content = json.loads(r.body)["choices"][0]["message"]["content"]
            assert parse_answer(content, "toxic", ["0", "1"], {}).error.startswith("parse_error")
    for kind, rate in zip(FAULT_KINDS, rates.values(), strict=True):
        sd = math.sqrt(n * rate * (1 - rate))
        assert abs(seen[kind] - n * rate) < 4 * sd, (kind, seen[kind], n * rate)
    m = sim.metrics()
    assert m["faults"] == seen and m["requests"] == n
    assert (
        m["ok"]
        == n - seen["rate_limit"] - seen["server_error"] - seen["unavailable"] - seen["malformed"]
    )
    assert m["status"] == {
        "200": n - seen["rate_limit"] - seen["server_error"] - seen["unavailable"],
        "429": seen["rate_limit"],
        "500": seen["server_error"],
        "503": seen["unavailable"],
    }


def _trace(sim: Simulator, n: int = 300) -> list[tuple]:
    return [
        (r.status, r.fault, r.delay_s, r.body if r.status != 200 else None)
        for r in (sim.reply(raw(f"c{i}")) for i in range(n))
    ]


def test_same_seed_same_faults_and_latencies_other_seed_not():
    kw = dict(
        rate_429=0.1,
        rate_500=0.1,
        rate_503=0.1,
        rate_malformed=0.1,
        latency_ms=20,
        latency_dist="lognormal",
    )
    assert _trace(faulty(seed=3, **kw)) == _trace(faulty(seed=3, **kw))
    assert _trace(faulty(seed=3, **kw)) != _trace(faulty(seed=4, **kw))
    # The latency stream is separate: another distribution leaves which requests fault alone.
    faults = [t[1] for t in _trace(faulty(seed=3, **kw))]
    assert faults == [t[1] for t in _trace(faulty(seed=3, **{**kw, "latency_dist": "normal"}))]


def test_a_retried_request_can_succeed():
    sim = faulty(seed=1, rate_500=0.5, rate_429=0.2)
    statuses = [sim.reply(raw("the very same comment")).status for _ in range(60)]
    assert 200 in statuses and 500 in statuses and 429 in statuses


def test_latency_distributions_are_seeded_and_never_negative():
    n = 4000
    fixed = [faulty(latency_ms=30).reply(raw("x")).delay_s for _ in range(3)]
    assert fixed == [0.03] * 3
    assert faulty(latency_ms=0, latency_dist="lognormal").reply(raw("x")).delay_s == 0.0
    for dist in ("normal", "lognormal"):
        sim = faulty(latency_ms=50, latency_dist=dist, latency_sigma=0.3, seed=5)
        delays = [sim.reply(raw(f"c{i}")).delay_s for i in range(n)]
        assert min(delays) >= 0
        assert statistics.fmean(delays) == pytest.approx(0.05, rel=0.03)
        rel_sd = statistics.stdev(delays) / statistics.fmean(delays)
        assert 0.25 < rel_sd < 0.36, (dist, rel_sd)  # lognormal: sqrt(exp(0.09) - 1) = 0.307
        again = faulty(latency_ms=50, latency_dist=dist, latency_sigma=0.3, seed=5)
        assert [again.reply(raw(f"c{i}")).delay_s for i in range(n)] == delays
    # A wide normal would go below zero half of the time: clipped, never negative.
    sim = faulty(latency_ms=10, latency_dist="normal", latency_sigma=3.0)
    delays = [sim.reply(raw(f"c{i}")).delay_s for i in range(1000)]
    assert min(delays) == 0.0 and max(delays) > 0.02


def test_injected_429_carries_retry_after():
    r = faulty(rate_429=1.0, retry_after_s=2.5).reply(raw("x"))
    assert r.status == 429 and r.headers == {"retry-after": "3", "retry-after-ms": "2500"}
    assert json.loads(r.body)["error"]["code"] == "rate_limit_exceeded"
    assert faulty(rate_429=1.0, retry_after_s=0).reply(raw("x")).headers == {
        "retry-after": "0",
        "retry-after-ms": "0",
    }


def test_per_key_rpm_limit_with_a_fake_clock():
    clock = FakeClock()
    sim = make(clock, rule="quickstart", rpm_per_key=60, rpm_burst=2)
    assert [sim.reply(raw("a"), "key-1").status for _ in range(2)] == [200, 200]  # the burst
    r = sim.reply(raw("a"), "key-1")
    assert r.status == 429 and r.fault is None and r.delay_s == 0
    assert r.headers == {"retry-after": "1", "retry-after-ms": "1000"}  # 60 rpm: one a second
    assert json.loads(r.body)["error"]["code"] == "rate_limit_exceeded"
    assert sim.reply(raw("a"), "key-2").status == 200  # keys are limited one by one
    clock.now += 0.25
    assert sim.reply(raw("a"), "key-1").headers == {"retry-after": "1", "retry-after-ms": "750"}
    clock.now += 0.75
    assert sim.reply(raw("a"), "key-1").status == 200
    assert sim.reply(raw("a"), "key-1").status == 429
    clock.now += 3600  # a long pause refills to the burst, not beyond
    assert [sim.reply(raw("a"), "key-1").status for _ in range(3)] == [200, 200, 429]
    m = sim.metrics()
    assert (
        m["rate_limited"] == 4
        and m["status"] == {"200": 6, "429": 4}
        and m["faults"]["rate_limit"] == 0
    )


def test_rpm_limiter_sustains_its_rate():
    clock = FakeClock()
    lim = RpmLimiter(rpm=600, clock=clock)  # 10/s, default burst: one second's worth
    assert lim.burst == 10
    admitted = 0
    for _ in range(6000):  # 60 s of one request every 10 ms
        admitted += lim.acquire("k") is None
        clock.now += 0.01
    assert 600 <= admitted <= 610  # 600 in the minute + the initial burst


def test_metrics_count_tokens_and_reset():
    clock = FakeClock()
    sim = make(clock, rule="quickstart")
    bodies = [json.loads(sim.reply(raw(f"c{i}")).body) for i in range(5)]
    sim.reply(b"not json")
    clock.now += 2
    m = sim.metrics()
    assert m["requests"] == 6 and m["ok"] == 5 and m["bad_request"] == 1 and m["rule"] == 5
    assert m["status"] == {"200": 5, "400": 1}
    assert m["prompt_tokens"] == sum(b["usage"]["prompt_tokens"] for b in bodies)
    assert m["total_tokens"] == sum(b["usage"]["total_tokens"] for b in bodies)
    assert m["in_flight"] == 0 and m["elapsed_s"] == 2.0
    assert len({b["id"] for b in bodies}) == 5
    sim.reset_metrics()
    m = sim.metrics()
    assert (
        m["requests"] == m["ok"] == m["total_tokens"] == 0
        and m["status"] == {}
        and m["elapsed_s"] == 0
    )
    assert set(m["faults"]) == set(FAULT_KINDS)


def test_fault_settings_are_checked_by_the_config_with_their_paths():
    with pytest.raises(ConfigError, match="teacher.simulator: .*sum to at most 1"):
        config(rate_429=0.7, rate_unparsable=0.7)
    with pytest.raises(ConfigError) as exc:
        config(rpm_per_key=-5, latency_dist="pareto", rate_hang=-0.1)
    problems = exc.value.problems
    for field in ("rpm_per_key", "latency_dist", "rate_hang"):
        assert any(p.startswith(f"teacher.simulator.{field}:") for p in problems), problems


def test_answers_stop_at_max_tokens_and_usage_counts_chat_framing():
    sim = make(rule="quickstart", seeds=True)
    tmpl = SeedsSection(path="s.jsonl").template
    messages = [{"role": "user", "content": tmpl.format(task="t", examples="- a", n=20)}]
    status, full = sim.answer({"messages": messages, "seed": 1})
    assert status == 200 and full["choices"][0]["finish_reason"] == "stop"
    assert full["usage"]["completion_tokens"] > 10
    _, cut = sim.answer({"messages": messages, "seed": 1, "max_tokens": 10, "n": 2})
    assert [c["finish_reason"] for c in cut["choices"]] == ["length", "length"]
    assert cut["usage"]["completion_tokens"] == 20  # 10 per sample
    assert cut["choices"][0]["message"]["content"] == full["choices"][0]["message"]["content"][:40]
    assert (
        cut["usage"]["prompt_tokens"]
        == count_prompt_tokens(messages)
        == 3 + 3 + math.ceil(len(messages[0]["content"]) / 4)
    )
    assert sim.answer({"messages": messages, "max_tokens": 0})[0] == 400


def test_the_cache_identity_changes_with_every_setting_that_changes_answers(tmp_path):
    base = simulator_identity(config(rule="quickstart"))
    assert base.startswith("simulator:")
    # Where and when it answers does not change what it says: same identity.
    for timing in ({"port": 9999}, {"latency_ms": 50, "latency_dist": "normal"}):
        assert simulator_identity(config(rule="quickstart", **timing)) == base
    changed = [
        {"rule": None},
        {"error_rate": 0.2},
        {"seed": 1},
        {"rate_unparsable": 0.1},
        {"rate_500": 0.1},
    ]
    ids = {simulator_identity(config(**{"rule": "quickstart", **c})) for c in changed}
    assert len(ids) == len(changed) and base not in ids
    for task in (
        {**synthetic.TASK, "label_key": "is_toxic"},
        {**synthetic.TASK, "labels": ["0", "1", "2"]},  # the label tokens' alternatives
        {**synthetic.TASK, "label_aliases": {"yes": "1"}},
    ):
        assert simulator_identity(config(task=task, rule="quickstart")) != base
    # The replay table's content, not only its name.
    table = tmp_path / "replay.csv"
    table.write_text("comment_text,simple_prompt\na,{'toxic': 1}\n")
    first = simulator_identity(config(replay=[{"path": str(table)}]))
    table.write_text("comment_text,simple_prompt\na,{'toxic': 0}\n")
    assert simulator_identity(config(replay=[{"path": str(table)}])) != first


# --------------------------------------------------------------------------------- logprobs
def completion(body):
    """The answer as the openai client reads it (raises when it is no valid ChatCompletion)."""
    return ChatCompletion.model_validate(body)


def label_entries(choice):
    """The label token's entry of a choice's logprobs: the one token that is not certain."""
    return [t for t in choice.logprobs.content if t.logprob != 0.0]


def test_logprobs_in_the_openai_format_with_the_label_as_its_own_token():
    sim = make(rule="quickstart", error_rate=0.2)
    for text in synthetic.generate_comments(30, seed=3):
        status, body = ask(sim, text, n=2, logprobs=True, top_logprobs=5)
        assert status == 200
        for i, choice in enumerate(completion(body).choices):
            content = choice.message.content
            tokens = choice.logprobs.content
            assert "".join(t.token for t in tokens) == content  # the tokens are the answer
            assert all(bytes(t.bytes) == t.token.encode() for t in tokens)
            (label,) = label_entries(choice)
            said = parse_answer(content, "toxic", ["0", "1"], {}).label
            assert label.token == said
            confidence = label_confidence(synthetic.error_draw(text, 0, i), 0.2)
            assert math.exp(label.logprob) == pytest.approx(confidence)
            # Its alternatives are the task's labels, most likely first, summing to 1.
            alternatives = {a.token: math.exp(a.logprob) for a in label.top_logprobs}
            assert set(alternatives) == {"0", "1"} and sum(alternatives.values()) == pytest.approx(
                1
            )
            assert label.top_logprobs[0].logprob >= label.top_logprobs[1].logprob
            assert alternatives[said] == pytest.approx(confidence)
            # Every other token is certain, its only alternative itself.
            others = [t for t in tokens if t is not label]
            assert all(
                [(a.token, a.logprob) for a in t.top_logprobs] == [(t.token, 0.0)] for t in others
            )


def test_logprobs_are_deterministic_and_only_sent_when_asked():
    text = "Stop being a loser, the last revert sounds a bit biased lol"
    one = ask(make(rule="quickstart"), text, n=3, logprobs=True, top_logprobs=2)[1]
    two = ask(make(rule="quickstart"), text, n=3, logprobs=True, top_logprobs=2)[1]
    assert [c["logprobs"] for c in one["choices"]] == [c["logprobs"] for c in two["choices"]]
    assert ask(make(rule="quickstart"), text)[1]["choices"][0]["logprobs"] is None
    # logprobs without top_logprobs: the tokens, no alternatives (as OpenAI does).
    bare = completion(ask(make(rule="quickstart"), text, logprobs=True)[1]).choices[0]
    assert bare.logprobs.content and all(t.top_logprobs == [] for t in bare.logprobs.content)
    # top_logprobs 1: the most likely label only.
    (label,) = label_entries(completion(one).choices[0])
    assert len(label.top_logprobs) == 2
    top1 = completion(ask(make(rule="quickstart"), text, logprobs=True, top_logprobs=1)[1])
    assert [a.token for a in label_entries(top1.choices[0])[0].top_logprobs] == [label.token]


def test_the_confidence_is_calibrated_and_low_where_the_teacher_errs():
    sim = make(rule="quickstart", error_rate=0.1)
    right, wrong = [], []
    for text in synthetic.generate_comments(600, seed=11):
        choice = completion(ask(sim, text, logprobs=True, top_logprobs=2)[1]).choices[0]
        (label,) = label_entries(choice)
        (right if label.token == synthetic.true_label(text) else wrong).append(
            math.exp(label.logprob)
        )
    accuracy = len(right) / (len(right) + len(wrong))
    assert 0.85 < accuracy < 0.95
    # Said with the confidence the answers earn: calibrated on the whole ...
    assert statistics.mean(right + wrong) == pytest.approx(accuracy, abs=0.03)
    # ... and unsure exactly where it errs (2/3: the band holds one wrong answer in three).
    assert all(c == pytest.approx(2 / 3) for c in wrong)
    assert {round(c, 6) for c in right} == {round(2 / 3, 6), round(1 - SURE_REST, 6)}
    assert label_confidence(0.5, 0.0) == 1 - SURE_REST and label_confidence(0.5, 0.4) == 0.6
    assert label_confidence(0.5, 1.0) == SURE_REST  # never log(0)


def test_replayed_answers_carry_logprobs_where_they_hold_a_label(tmp_path):
    table = tmp_path / "replay.jsonl"
    rows = {
        "fenced": '```python\n{"toxic": 1}\n```',
        "alias": '{"toxic": true}',
        "prose": "I'm not sure about this one.",
        # The regex's first 'toxic: 1' is in the reasoning; the parser reads the verdict 0.
        "reasoning": 'Someone may say toxic: 1 here, but {"toxic": 0}',
    }
    table.write_text(
        "".join(json.dumps({"comment_text": k, "simple_prompt": v}) + "\n" for k, v in rows.items())
    )
    sim = make(replay=[{"path": str(table)}], error_rate=0.0)
    for text, recorded in rows.items():
        body = ask(sim, text, n=2, logprobs=True, top_logprobs=3)[1]
        choices = completion(body).choices
        assert choices[0].logprobs == choices[1].logprobs  # the same answer, the same logprobs
        assert "".join(t.token for t in choices[0].logprobs.content) == recorded
        labels = label_entries(choices[0])
        if text in ("prose", "reasoning"):
            assert labels == []
            continue
        (label,) = labels
        assert label.token == {"fenced": "1", "alias": "true"}[text]
        assert math.exp(label.logprob) == pytest.approx(1 - SURE_REST)
        # The alias is answered as spelled; its alternative is the other label.
        assert [a.token for a in label.top_logprobs] == [label.token, "0"]


def test_a_cut_off_answer_has_no_label_token():
    sim = make(rule="quickstart")
    text = "You are a moron, this article is too long"
    choice = completion(ask(sim, text, max_tokens=2, logprobs=True, top_logprobs=2)[1]).choices[0]
    assert choice.finish_reason == "length"
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    assert label_entries(choice) == []


def test_bad_logprob_requests_are_400_with_the_reason():
    sim = make(rule="quickstart")
    for body, reason in (
        ({"logprobs": True, "top_logprobs": 21}, "'top_logprobs' must be an integer in [0, 20]"),
        ({"logprobs": True, "top_logprobs": -1}, "got -1"),
        ({"logprobs": True, "top_logprobs": "3"}, "got '3'"),
        ({"logprobs": True, "top_logprobs": True}, "got True"),
        ({"top_logprobs": 3}, "'top_logprobs' needs 'logprobs': true"),
        ({"logprobs": False, "top_logprobs": 3}, "needs 'logprobs': true"),
        ({"logprobs": "yes"}, "'logprobs' must be a boolean, got 'yes'"),
    ):
        status, err = ask(sim, "hi", **body)
        assert status == 400 and reason in err["error"]["message"], (body, err)


def test_the_label_distribution_of_a_simulated_answer():
    """What a classifier student learns from a row: the simulator's confidence, read back
    from the answer's logprobs as the client keeps them."""
    sim = make(rule="quickstart", error_rate=0.1)
    for text in synthetic.generate_comments(40, seed=5):
        choice = completion(ask(sim, text, logprobs=True, top_logprobs=2)[1]).choices[0]
        said = parse_answer(choice.message.content, "toxic", ["0", "1"], {}).label
        confidence = label_confidence(synthetic.error_draw(text, 0), 0.1)
        probs = label_distribution(token_logprobs(choice), ["0", "1"])
        assert probs[int(said)] == pytest.approx(confidence)
        assert sum(probs) == pytest.approx(1.0)
