"""The serving parts that are plain Python: the serve config section, launch-mode decisions,
live settings, the request log (read back by the generate stage's reader), drift, the Serve
config file, the teacher proxy's error replies. No Ray cluster."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import threading
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest
from ray.serve.schema import ServeDeploySchema

from ray_pipeline.config import ConfigError, LogSource, ServeSection, TaskSection, load_config
from ray_pipeline.data import synthetic
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.data.schema import OK
from ray_pipeline.data.sources import log_rows
from ray_pipeline.serving.args import AppArgs
from ray_pipeline.serving.drift import DriftMonitor, drift_figure, psi, reference
from ray_pipeline.serving.live import apply_live, live_settings
from ray_pipeline.serving.request_log import SCHEMA, RequestLogFiles, log_files, partition_of
from ray_pipeline.serving.stage import _serve_until_stopped, serve_config
from ray_pipeline.teacher.client import TeacherCallError
from ray_pipeline.teacher.quota import BudgetExhausted
from serve_apps.protocol import Reply
from serve_apps.request_log import Background
from serve_apps.routing import Answers, fallback_reason, pick, sticky_point
from serve_apps.teacher_proxy import error_reply

TASK = TaskSection.model_validate(synthetic.TASK)
PROMPT = Prompt(synthetic.PROMPT)


def _base(**serve) -> dict:
    return {
        "task": synthetic.TASK,
        "teacher": {"simulator": {"enabled": True, "rule": "quickstart"}},
        "data": {"logs": [{"path": "x.jsonl"}]},
        "serve": serve,
    }


# --------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("serve", "message"),
    [
        ({"weights": {"studnet": 1}}, "weights name unknown targets ['studnet']"),
        ({"weights": {"student": -1, "teacher": 1}}, "weights must be >= 0"),
        ({"mode": "shadow", "shadow": {"primary": "teacher"}}, "both 'teacher'"),
        ({"mode": "shadow", "shadow": {"target": "v2"}}, "shadow.target 'v2' is not a target"),
        ({"mode": "hybrid", "hybrid": {"student": "v2"}}, "hybrid.student 'v2' is not a student"),
        ({"students": {"teacher": {}}}, "not 'teacher' or 'auto'"),
        ({"students": {"a b": {}}}, "letters, digits"),
        ({"students": {}}, "give at least one student"),
        (
            {"router": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}},
            "exceeds max_replicas",
        ),
        ({"batching": {"max_batch_size": 64}}, "could never fill a batch"),
        (
            {"student_placement": "router", "router": {"max_ongoing_requests": 8}},
            "router.max_ongoing_requests (8) must be >= batching.max_batch_size (16)",
        ),
        (
            {"student_placement": "router", "student": {"autoscaling": {"max_replicas": 4}}},
            "with student_placement 'router' the students are in the router's replicas",
        ),
        ({"student_placement": "inside"}, "serve.student_placement"),
        ({"hybrid": {"min_confidence": 1.5}}, "serve.hybrid.min_confidence"),
        ({"request_log": {"format": "csv"}}, "serve.request_log.format"),
    ],
)
def test_serve_section_problems_are_named(serve, message):
    with pytest.raises(ConfigError) as exc:
        load_config(data=_base(**serve))
    assert message in "\n".join(exc.value.problems)


def test_only_the_active_modes_targets_must_exist():
    cfg = load_config(
        data=_base(students={"v1": {}}, mode="hybrid", hybrid={"student": "v1"})
    )  # the default weights name 'student': unused in hybrid mode
    assert cfg.serve.targets == ["v1", "teacher"]


# ------------------------------------------------------------------------------- routing
def test_the_split_follows_the_weights():
    rng = random.Random(0)
    weights = {"v2": 0.1, "student": 0.6, "teacher": 0.3, "off": 0.0}
    counts = Counter(pick(weights, None, rng) for _ in range(20_000))
    assert set(counts) == {"v2", "student", "teacher"}
    for name, w in weights.items():
        assert abs(counts[name] / 20_000 - w) < 0.015, (name, counts)


def test_sticky_users_keep_their_target_and_a_growing_canary_only_gains_users():
    rng = random.Random(0)
    users = [f"user-{i}" for i in range(2000)]
    steps = [0.01, 0.1, 0.5, 1.0]
    seen = []
    for w in steps:
        weights = {"canary": w, "student": 1 - w}
        first = {u: pick(weights, u, rng) for u in users}
        assert first == {u: pick(weights, u, rng) for u in users}  # same user, same target
        seen.append({u for u, t in first.items() if t == "canary"})
        assert abs(len(seen[-1]) / len(users) - w) < 0.03
    assert all(a <= b for a, b in zip(seen, seen[1:], strict=False))
    assert 0 <= sticky_point("\ud800 lone") < 1  # any header value, even undecodable text


def test_answers_validity_and_agreement():
    answers = Answers(TASK)
    assert answers.valid('{"toxic": 1}') and answers.valid('```json\n{"toxic": 0}\n```')
    assert not answers.valid("I think so") and not answers.valid('{"toxic": 7}')
    assert answers.agree('{"toxic": 1}', '```python\n{"toxic": 1}\n```')
    assert not answers.agree('{"toxic": 1}', '{"toxic": 0}')
    assert answers.agree("same prose", " same prose ") and not answers.agree("a", "b")


def test_answers_of_a_generative_task():
    task = TaskSection.model_validate(
        {
            "kind": "generative",
            "prompt": {"template": "{input}"},
            "output_schema": {"type": "object"},
        }
    )
    answers = Answers(task)
    assert answers.valid('Sure: {"answer": "Paris"}') and not answers.valid("Paris")
    assert answers.label('{"answer": "Paris"}') is None  # no labels: text answers
    assert answers.agree(' {"a": 1}', '{"a": 1}') and not answers.agree('{"a": 1}', '{"a": 2}')
    free = Answers(
        TaskSection.model_validate({"kind": "generative", "prompt": {"template": "{input}"}})
    )
    assert free.valid("Paris") and not free.valid("  ")


def test_hybrid_falls_back_on_error_format_or_low_confidence():
    sure, unsure = Reply("x", 1, 1, confidence=0.95), Reply("x", 1, 1, confidence=0.4)
    assert fallback_reason(sure, None, True, 0.8) is None
    assert fallback_reason(unsure, None, True, 0.8) == "low_confidence"
    assert fallback_reason(sure, None, False, 0.8) == "invalid_format"
    assert fallback_reason(None, "timeout", False, 0.8) == "timeout"
    assert fallback_reason(unsure, None, True, 0.0) is None


def test_live_settings_are_validated_by_the_config_rules():
    serve = ServeSection(students={"student": {}, "v2": {}})
    assert live_settings(serve) == {
        "weights": {"student": 0.9, "teacher": 0.1},
        "min_confidence": 0.8,
        "shadow_sample_rate": 1.0,
    }
    changed = apply_live(serve, {"weights": {"v2": 0.5, "student": 0.5}, "min_confidence": 0.3})
    assert changed.weights == {"v2": 0.5, "student": 0.5} and changed.hybrid.min_confidence == 0.3
    with pytest.raises(ValueError, match=r"unknown targets \['v3'\]"):
        apply_live(serve, {"weights": {"v3": 1}})
    with pytest.raises(ValueError, match="shadow.sample_rate"):
        apply_live(serve, {"shadow_sample_rate": 2})
    with pytest.raises(ValueError, match=r"unknown live settings \['mode'\]"):
        apply_live(serve, {"mode": "hybrid"})


# --------------------------------------------------------------------------- request log
def _record(i: int, served_by: str, ts: float) -> dict:
    text = f"comment number {i}, you idiot" if i % 2 else f"comment number {i}, fine"
    answer = json.dumps({"toxic": i % 2})
    return {
        "id": f"chatcmpl-{i}",
        "ts": ts,
        "endpoint": "chat.completions",
        "mode": "canary",
        "request": {
            "model": "auto",
            "messages": PROMPT.messages(text),
            "max_tokens": 16,
            "stop": None,
            "stream": None,
            "seed": None,
            "top_p": None,
            "user": "u\u2028x",
        },
        "response": {
            "id": f"chatcmpl-{i}",
            "object": "chat.completion",
            "created": int(ts),
            "model": served_by,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45},
        },
        "served_by": served_by,
        "status": 200,
        "error": None,
        "latency_ms": 3.5,
        "confidence": 0.9 if served_by != "teacher" else None,
        "valid": True,
        "fallback": None,
        "shadow": None,
    }


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_request_log_is_partitioned_by_time_and_read_by_the_generate_stage(tmp_path, fmt):
    hour = 3600.0
    t0 = 1_750_000_000.0 - 1_750_000_000.0 % hour
    records = [
        _record(i, "teacher" if i % 3 == 0 else "student", t0 + (i // 4) * hour) for i in range(10)
    ]
    files = RequestLogFiles(tmp_path, fmt, "hour", "replica1")
    files.write(records[:6])
    files.write(records[6:])
    found = log_files(tmp_path)
    parts = sorted({f.parent.name for f in found})
    assert parts == [partition_of(t0 + k * hour, "hour") for k in range(3)]
    assert parts[0] == time.strftime("%Y-%m-%dT%H", time.gmtime(t0))
    rows = []
    for f in found:
        src = LogSource(path=f)
        rows += list(log_rows(io.BytesIO(f.read_bytes()), str(f), src, PROMPT, TASK))
    assert len(rows) == 10 and {r["status"] for r in rows} == {OK}
    by_input = {r["input"]: r for r in rows}
    for rec in records:
        text = PROMPT.extract(rec["request"]["messages"][0]["content"])
        row = by_input[text]
        # A teacher's answer is a label to learn from; a student's goes back to the teacher.
        if rec["served_by"] == "teacher":
            assert row["response"] == rec["response"]["choices"][0]["message"]["content"]
        else:
            assert row["response"] is None
    if fmt == "parquet":
        assert pq.read_schema(found[0]).equals(SCHEMA)  # one schema for every file


def test_background_hands_records_over_off_the_caller_and_survives_a_failing_sink():
    got: list[dict] = []
    calls = {"bad": 0}

    def bad(records):
        calls["bad"] += 1
        raise OSError("disk full")

    bg = Background([got.extend, bad], flush_s=0.05)
    caller = threading.get_ident()
    seen_threads = set()
    bg.sinks.insert(0, lambda records: seen_threads.add(threading.get_ident()))
    for i in range(100):
        bg.put({"i": i})
    assert bg.flush(timeout_s=10)
    assert [r["i"] for r in got] == list(range(100))
    assert calls["bad"] >= 1 and bg.failed == 100
    assert seen_threads and caller not in seen_threads
    bg.put({"i": 100})
    bg.close()
    assert got[-1] == {"i": 100}  # what was queued is handed over on close


def test_the_tick_runs_in_the_background_thread_without_records_and_survives_failing():
    ticks: list[int] = []

    def tick():
        ticks.append(threading.get_ident())
        if len(ticks) == 1:
            raise RuntimeError("exporter down")

    bg = Background([], flush_s=0.02, tick=tick)
    deadline = time.monotonic() + 10
    while len(ticks) < 3 and time.monotonic() < deadline:  # no record was ever put
        time.sleep(0.02)
    bg.close()
    assert len(ticks) >= 3 and threading.get_ident() not in ticks  # went on after the failure


def test_router_gauges_are_reported_again_on_refresh():
    """Ray's metrics agent drops a gauge two report intervals after its last set: the
    router's rates are set again on every tick, with their tags, at their last value."""
    from serve_apps.router import RouterMetrics

    class FakeGauge:
        def __init__(self, name):
            self.info = {"name": name}
            self.sets: list[tuple[float, dict | None]] = []

        def set(self, value, tags=None):
            self.sets.append((value, tags))

    m = RouterMetrics()
    rate, validity = FakeGauge("rate"), FakeGauge("validity")
    m.set_gauge(rate, 0.25)
    m.set_gauge(rate, 0.5)
    m.set_gauge(validity, 1.0, tags={"student": "a"})
    m.set_gauge(validity, 0.75, tags={"student": "b"})
    m.refresh()
    assert rate.sets == [(0.25, None), (0.5, None), (0.5, None)]
    assert validity.sets[2:] == [(1.0, {"student": "a"}), (0.75, {"student": "b"})]


# --------------------------------------------------------------------------------- drift
def test_drift_against_the_training_inputs(tmp_path):
    train = synthetic.generate_comments(300, seed=1)
    ref = reference(train)
    assert sum(ref["length_shares"]) == pytest.approx(1.0)
    same = DriftMonitor(ref)
    for t in synthetic.generate_comments(300, seed=2):
        same.observe(t)
    shifted = DriftMonitor(ref)
    for i in range(300):
        shifted.observe(f"zzqx{i} " * 40)  # long, and words never seen in training
    s, d = same.snapshot(), shifted.snapshot()
    assert s["length_psi"] < 0.1 < 1 < d["length_psi"]
    assert s["unknown_word_rate"] < 0.05 and d["unknown_word_rate"] == 1.0
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert drift_figure(shifted, tmp_path / "drift.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no training inputs"):
        reference([])


# --------------------------------------------------------------------------- serve config
def _args(tmp_path, **serve) -> dict:
    section = {"request_log": {"dir": str(tmp_path / "log")}, "student": {"num_gpus": 0}, **serve}
    return AppArgs(
        serve=section,
        task=synthetic.TASK,
        teacher={"model": "sim-teacher", "simulator": {"enabled": True}},
        teacher_base_url="http://127.0.0.1:1/v1",
        teacher_api_key_env=None,
        students={"student": str(tmp_path / "ckpt")},
    ).model_dump(mode="json")


def test_the_serve_config_file_is_valid_and_carries_the_live_settings(tmp_path):
    config = serve_config(_args(tmp_path, weights={"student": 0.7, "teacher": 0.3}))
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    assert app["import_path"] == "serve_apps.router:app"
    assert app["deployments"] == [
        {
            "name": "RouterControl",
            "user_config": {
                "weights": {"student": 0.7, "teacher": 0.3},
                "min_confidence": 0.8,
                "shadow_sample_rate": 1.0,
            },
        }
    ]
    assert AppArgs.model_validate(app["args"]).serve.weights == {"student": 0.7, "teacher": 0.3}
    direct = serve_config(_args(tmp_path), "alone", "/alone", "serve_apps.student:direct_app")
    assert "deployments" not in direct["applications"][0]


def test_app_args_must_be_resolved(tmp_path):
    args = _args(tmp_path)
    args["students"] = {"other": "x"}
    with pytest.raises(ValueError, match="must be the serve section's"):
        AppArgs.model_validate(args)
    args = _args(tmp_path)
    args["serve"]["student"]["num_gpus"] = None
    with pytest.raises(ValueError, match="num_gpus must be resolved"):
        AppArgs.model_validate(args)


# ------------------------------------------------------------------------- teacher proxy
def test_teacher_failures_become_the_right_status():
    def reply(code):
        return error_reply(TeacherCallError("boom", "APIStatusError", code, 3))["error"]

    assert reply(500)["status"] == 502 and reply(None)["status"] == 502
    assert (reply(429)["status"], reply(429)["code"]) == (429, "rate_limit_exceeded")
    assert (reply(400)["status"], reply(400)["code"]) == (400, "teacher_refused")
    budget = error_reply(BudgetExhausted("max_cost_usd 1.0 reached"))["error"]
    assert (budget["status"], budget["code"]) == (429, "insufficient_quota")


def test_the_readmes_serve_example_is_a_valid_serve_section(root):
    import re

    import yaml

    text = (root / "README.md").read_text()
    block = re.search(r"```yaml\n(serve:.*?)```", text[text.index("## Serving") :], re.S)
    data = _base()
    data["serve"] = yaml.safe_load(block.group(1))["serve"]
    serve = load_config(data=data).serve
    assert serve.targets == ["student", "student-v2", "teacher"] and serve.api_key_env


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serving_waits_for_ctrl_c_or_sigterm_and_restores_the_handlers(sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def send() -> None:
        # Only once the handler is in place (a SIGTERM before it would end the test run).
        while signal.getsignal(sig) == before[sig]:
            time.sleep(0.01)
        os.kill(os.getpid(), sig)

    sender = threading.Thread(target=send)
    sender.start()
    assert _serve_until_stopped("http://x") == sig.name
    sender.join()
    assert {s: signal.getsignal(s) for s in before} == before
