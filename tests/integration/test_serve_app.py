"""The Serve app (``serve_apps.router:app``) deployed from its Serve config, as ``serve
deploy`` does, on local Ray, with the e2e run's students and the simulator as teacher, called
with the real openai client.

Four apps on one Serve instance:

* ``canary``: two LoRA students on one base (one deployment) and the teacher, split 20/50/30,
  sticky per user, bearer-token auth and admin key on, JSONL request log;
* ``shadow``: the student answers, a copy goes to a teacher that fails half its requests and
  is wrong on half the rest; Parquet request log; no auth;
* ``hybrid``: the student first, the teacher when unsure; the teacher's budget (the shared
  quota) is small enough for the last test to spend it;
* ``inrouter``: the canary's two LoRA students loaded in the router's replica
  (``serve.student_placement: router``), split 50/50, no auth, admin key on.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import openai
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings

from ray_pipeline.config import load_config
from ray_pipeline.data import synthetic
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.run_state import Run, load_report
from ray_pipeline.serving.request_log import log_files
from ray_pipeline.serving.stage import (
    TARGET_HEADER,
    app_args,
    deploy_config,
    free_port,
    serve_config,
)
from ray_pipeline.teacher.sim_server import simulator_process
from tests.integration.conftest import ROOT, write_sim_config
from tests.unit.test_serve_protocol import malformed

pytestmark = pytest.mark.integration
PROMPT = Prompt(synthetic.PROMPT)
KEY, ADMIN = "test-serve-key", "test-admin-key"
FALLBACK = "x-distill-fallback"
TEXTS = synthetic.generate_comments(400, seed=21)


class Served:
    def __init__(self, base: str, config: dict, logs: dict[str, Path]):
        self.base = base
        self.config = config
        self.logs = logs

    def client(self, app: str, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/{app}/v1", api_key=key, max_retries=0)

    def admin(self, app: str, method: str, path: str, **kw) -> httpx2.Response:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        return httpx2.request(method, f"{self.base}/{app}/admin/{path}", headers=headers, **kw)

    def records(self, app: str) -> list[dict]:
        self.admin(app, "GET", "stats")  # waits until the router's log is written
        out = []
        for f in log_files(self.logs[app]):
            if f.suffix == ".parquet":
                out += pq.read_table(f).to_pylist()
            else:
                out += [json.loads(x) for x in f.read_text().splitlines()]
        return out


@pytest.fixture(scope="module")
def served(ray_local, e2e_run, tmp_path_factory):
    from ray import serve

    tmp = tmp_path_factory.mktemp("serve")
    sims = contextlib.ExitStack()
    good = sims.enter_context(
        simulator_process(write_sim_config(tmp / "good.yaml", rule="quickstart"))
    )
    flaky = sims.enter_context(
        simulator_process(
            write_sim_config(tmp / "flaky.yaml", rule="quickstart", error_rate=0.5, rate_500=0.5)
        )
    )
    first = load_report(e2e_run)["train"]["checkpoint"]  # beside the sweep's best: one base
    port = free_port("127.0.0.1")
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    small = [
        f"run.output_dir={e2e_run.parent}",
        "serve.router.num_cpus=0.05",
        "serve.student.num_cpus=0.05",
        "serve.teacher.num_cpus=0.05",
        "serve.request_log.flush_s=0.2",
        "serve.max_new_tokens=16",
    ]
    logs = {name: tmp / f"log-{name}" for name in ("canary", "shadow", "hybrid", "inrouter")}
    apps = {
        "canary": (
            good,
            [
                f"serve.students={{student: {{}}, student-v0: {{checkpoint: {first}}}}}",
                "serve.weights={student-v0: 0.2, student: 0.5, teacher: 0.3}",
                "serve.api_key_env=DISTILL_TEST_SERVE_KEY",
                "serve.admin_key_env=DISTILL_TEST_ADMIN_KEY",
            ],
        ),
        "shadow": (
            flaky,
            ["serve.mode=shadow", "serve.request_log.format=parquet", "teacher.max_attempts=1"],
        ),
        "hybrid": (
            good,
            [
                "serve.mode=hybrid",
                "serve.hybrid.student_timeout_s=3",
                "serve.admin_key_env=DISTILL_TEST_ADMIN_KEY",
                "teacher.budget.max_tokens=6000",
            ],
        ),
        "inrouter": (
            good,
            [
                f"serve.students={{student: {{}}, student-v0: {{checkpoint: {first}}}}}",
                "serve.weights={student-v0: 0.5, student: 0.5}",
                "serve.student_placement=router",
                "serve.admin_key_env=DISTILL_TEST_ADMIN_KEY",
                # The four apps reserve 0.5 CPU in all: the next-round test's generate stage
                # needs 1.5 of the session's 2 (its parse tasks take 1).
                "serve.router.num_cpus=0.02",
                "serve.student.num_cpus=0.03",
                "serve.teacher.num_cpus=0",
            ],
        ),
    }
    config = None
    for name, (teacher_url, overrides) in apps.items():
        cfg = load_config(
            ROOT / "configs/quickstart.yaml",
            [*small, f"serve.request_log.dir={logs[name]}", *overrides],
        )
        run = Run(cfg, e2e_run.name, e2e_run)  # the e2e run's students, its folder untouched
        one = serve_config(app_args(run, teacher_url, None), name, f"/{name}")
        # The keys reach the replicas through the app's environment (a test's shortcut: a
        # real deployment sets them on the cluster, never in a config Serve stores).
        # Added beside the app's own (serve.throughput_optimized), as an operator would.
        one["applications"][0]["runtime_env"].setdefault("env_vars", {}).update(
            {"DISTILL_TEST_SERVE_KEY": KEY, "DISTILL_TEST_ADMIN_KEY": ADMIN}
        )
        if config is None:
            config = one
        else:
            config["applications"] += one["applications"]
    deploy_config(config)
    yield Served(f"http://127.0.0.1:{port}", config, logs)
    serve.shutdown()
    sims.close()


@pytest.fixture(scope="module")
def http():
    with httpx2.Client(timeout=60) as client:
        yield client


def ask(client: openai.OpenAI, text: str, model: str = "auto", **kw):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=PROMPT.messages(text), max_tokens=16, **kw
    )
    return raw.headers, raw.parse()


def many(fn, items, workers: int = 8) -> list:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


# -------------------------------------------------------------------------------- canary
def test_canary_split_follows_the_weights_and_every_request_is_logged(served):
    client = served.client("canary")
    n = 300
    results = many(lambda t: ask(client, t), TEXTS[:n])
    targets = Counter(h[TARGET_HEADER] for h, _ in results)
    assert sum(targets.values()) == n
    for name, w in {"student-v0": 0.2, "student": 0.5, "teacher": 0.3}.items():
        assert abs(targets[name] / n - w) < 0.09, targets
    assert all(c.model == h[TARGET_HEADER] and c.choices[0].message.content for h, c in results)
    assert all(c.usage.prompt_tokens > 10 and c.usage.completion_tokens > 0 for _, c in results)
    by_id = {r["id"]: r for r in served.records("canary")}
    for h, c in results:
        rec = by_id[c.id]
        assert rec["served_by"] == h[TARGET_HEADER] and rec["status"] == 200
        assert rec["response"]["choices"][0]["message"]["content"] == c.choices[0].message.content
        assert (rec["confidence"] is None) == (rec["served_by"] == "teacher")


def test_sticky_users_always_get_the_same_target(served):
    client = served.client("canary")
    seen: dict[str, set[str]] = {}
    for i in range(12):
        user = f"user-{i}"
        for text in TEXTS[i * 5 : i * 5 + 5]:
            headers, _ = ask(client, text, extra_headers={"x-distill-user": user})
            seen.setdefault(user, set()).add(headers[TARGET_HEADER])
    assert all(len(t) == 1 for t in seen.values()), seen
    assert len({next(iter(t)) for t in seen.values()}) > 1  # users are spread over targets


def test_the_model_field_picks_a_target_and_models_are_listed(served):
    client = served.client("canary")
    for target in ("student", "student-v0", "teacher"):
        assert {ask(client, "what a clown", model=target)[0][TARGET_HEADER] for _ in range(3)} == {
            target
        }
    assert {m.id for m in client.models.list().data} == {"auto", "student", "student-v0", "teacher"}
    with pytest.raises(openai.NotFoundError) as exc:
        ask(client, "hi", model="gpt-5")
    assert exc.value.body["code"] == "model_not_found"


def test_auth_on_and_off(served):
    with pytest.raises(openai.AuthenticationError) as exc:
        ask(served.client("canary", key="wrong-key"), "hello")
    assert exc.value.status_code == 401 and exc.value.body["code"] == "invalid_api_key"
    r = httpx2.get(f"{served.base}/canary/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert ask(served.client("canary"), "hello")[0][TARGET_HEADER]
    # The shadow app has no key: any key (or none) is fine; its admin endpoints are off.
    assert ask(served.client("shadow", key="anything"), "hello")[0][TARGET_HEADER] == "student"
    assert served.admin("shadow", "GET", "live").status_code == 403
    assert httpx2.get(f"{served.base}/canary/admin/live").status_code == 401
    log_text = "".join(f.read_text() for f in log_files(served.logs["canary"]))
    assert KEY not in log_text and ADMIN not in log_text


def test_streaming_gives_the_same_answer_in_pieces(served):
    client = served.client("canary")
    for model in ("student", "teacher"):
        _, whole = ask(client, TEXTS[0], model=model)
        stream = client.chat.completions.create(
            model=model,
            messages=PROMPT.messages(TEXTS[0]),
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
        assert len([c for c in chunks if c.choices]) >= 3
    pieces = list(
        client.completions.create(
            model="student",
            prompt=PROMPT.messages(TEXTS[1])[0]["content"],
            max_tokens=16,
            stream=True,
        )
    )
    text = client.completions.create(
        model="student", prompt=PROMPT.messages(TEXTS[1])[0]["content"], max_tokens=16
    )
    assert "".join(p.choices[0].text for p in pieces if p.choices) == text.choices[0].text


def test_live_reweighting_under_load_fails_no_request(served):
    """Weights change by the admin endpoint and by a Serve config update of the
    RouterControl's user_config (no replica restarts), while 8 clients keep sending."""
    client = served.client("canary")
    stop = threading.Event()
    outcomes: list[tuple[float, str | None, int]] = []

    def load(k: int) -> None:
        i = k
        while not stop.is_set():
            try:
                headers, _ = ask(client, TEXTS[i % len(TEXTS)])
                outcomes.append((time.monotonic(), headers[TARGET_HEADER], 200))
            except openai.APIStatusError as e:
                outcomes.append((time.monotonic(), None, e.status_code))
            except openai.APIConnectionError:
                outcomes.append((time.monotonic(), None, 0))
            i += 8

    threads = [threading.Thread(target=load, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    changes = []  # (started, done, target): a change may apply any time in between
    try:
        time.sleep(1.0)
        started = time.monotonic()
        r = served.admin("canary", "PUT", "live", json={"weights": {"student-v0": 1.0}})
        assert r.status_code == 200, r.text
        changes.append((started, time.monotonic(), "student-v0"))
        time.sleep(2.0)
        app = next(a for a in served.config["applications"] if a["name"] == "canary")
        app["deployments"][0]["user_config"]["weights"] = {"teacher": 1.0}
        started = time.monotonic()
        deploy_config(served.config)
        changes.append((started, time.monotonic(), "teacher"))
        time.sleep(2.0)
        bad = served.admin("canary", "PUT", "live", json={"weights": {"nobody": 1.0}})
        assert bad.status_code == 400 and "unknown targets ['nobody']" in bad.text
    finally:
        stop.set()
        for t in threads:
            t.join()
        app["deployments"][0]["user_config"]["weights"] = {
            "student-v0": 0.2,
            "student": 0.5,
            "teacher": 0.3,
        }
        deploy_config(served.config)
    assert len(outcomes) > 50 and {s for _, _, s in outcomes} == {200}
    ends = [c[0] for c in changes[1:]] + [max(t for t, _, _ in outcomes) + 1]
    for (_, done, target), end in zip(changes, ends, strict=True):
        # From a second after a change is done (routers poll twice a second) until the next
        # one starts, every request goes to the new target.
        after = [tgt for t, tgt, _ in outcomes if done + 1.0 <= t < end]
        assert after and set(after) == {target}, (target, Counter(after))
    live = served.admin("canary", "GET", "live").json()["live"]
    assert live["weights"] == {"student-v0": 0.2, "student": 0.5, "teacher": 0.3}


@settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(raw=malformed())
def test_malformed_requests_are_all_4xx(served, http, raw):
    r = http.post(
        f"{served.base}/canary/v1/chat/completions",
        content=raw,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert 400 <= r.status_code < 500, (r.status_code, raw[:200], r.text[:300])
    assert r.json()["error"]["message"]


def test_the_requests_a_user_found_wrong_are_4xx_and_the_server_still_answers(served):
    url = f"{served.base}/canary/v1/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}"}
    good = {"model": "auto", "messages": PROMPT.messages("a comment")}
    cases = [
        ({**good, "max_tokens": -1}, 400, "max_tokens"),
        ({**good, "messages": [{"content": "x"}]}, 400, "messages[0].role"),
        ({**good, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
        ({**good, "model": "nope"}, 404, "model"),
        ({**good, "n": 1000}, 400, "n"),
        ({**good, "logprobs": True}, 400, "logprobs"),
        ({**good, "model": "student", "messages": PROMPT.messages("word " * 200_000)}, 400, None),
        ({**good, "max_tokens": 17}, 400, "max_tokens"),  # over serve.max_new_tokens
    ]
    for body, status, param in cases:
        r = httpx2.post(url, json=body, headers=headers, timeout=60)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), r.text
    lone = b'{"model": "auto", "messages": [{"role": "user", "content": "\\ud800"}]}'
    r = httpx2.post(url, content=lone, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_encoding"
    too_big = httpx2.post(url, content=b"x" * 1_100_000, headers=headers)
    assert too_big.status_code == 413
    long = httpx2.post(url, json=cases[6][0], headers=headers, timeout=60).json()["error"]
    assert long["code"] == "context_length_exceeded" and "512 tokens" in long["message"]
    assert httpx2.delete(url, headers=headers).status_code == 405
    assert httpx2.post(f"{served.base}/canary/v2/nothing", headers=headers).status_code == 404
    assert ask(served.client("canary"), "still here?")[0][TARGET_HEADER]


# -------------------------------------------------------------------------------- shadow
def test_shadow_answers_from_the_primary_and_logs_both_answers(served):
    client = served.client("shadow")
    results = many(lambda t: ask(client, t), TEXTS[:40])
    assert {h[TARGET_HEADER] for h, _ in results} == {"student"}
    ids = {c.id for _, c in results}
    deadline = time.monotonic() + 30
    while True:
        records = [r for r in served.records("shadow") if r["id"] in ids]
        if len(records) == 40 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(records) == 40  # each written once its shadow answered
    shadows = [r["shadow"] for r in records]
    assert {s["target"] for s in shadows} == {"teacher"}
    failed = [s for s in shadows if s["status"] != 200]
    compared = [s for s in shadows if s["status"] == 200]
    assert failed and all(s["agree"] is None and "500" in s["error"] for s in failed)
    # The teacher is wrong on half its answers: both agreements and disagreements show.
    assert {s["agree"] for s in compared} == {True, False}
    for r in records:
        if r["shadow"]["status"] == 200:
            assert r["shadow"]["answer"]
    # A failing teacher asked directly is a 502 that says why (the simulator's 500).
    errors = []
    for text in TEXTS[:30]:
        try:
            ask(client, text, model="teacher")
        except openai.InternalServerError as e:
            errors.append(e)
            break
    assert errors and errors[0].status_code == 502
    assert "teacher failed" in str(errors[0].body) and "500" in str(errors[0].body)
    assert errors[0].response.headers[TARGET_HEADER] == "teacher"


# -------------------------------------------------------------------------------- hybrid
def test_hybrid_falls_back_to_the_teacher_when_the_student_is_unsure(served):
    client = served.client("hybrid")
    r = served.admin("hybrid", "PUT", "live", json={"min_confidence": 1.0})
    assert r.status_code == 200 and r.json()["live"]["min_confidence"] == 1.0
    unsure = [ask(client, t)[0] for t in TEXTS[:10]]
    assert {(h[TARGET_HEADER], h[FALLBACK]) for h in unsure} == {("teacher", "low_confidence")}
    served.admin("hybrid", "PUT", "live", json={"min_confidence": 0.0})
    sure = [ask(client, t)[0] for t in TEXTS[10:20]]
    assert {h[TARGET_HEADER] for h in sure} == {"student"} and all(FALLBACK not in h for h in sure)
    stats = served.admin("hybrid", "GET", "stats").json()
    assert stats["counts"]["fallbacks"]["low_confidence"] >= 10 and stats["counts"]["hybrid"] >= 20
    assert stats["drift"]["inputs"] >= 20 and stats["drift"]["length_psi"] is not None
    records = [r for r in served.records("hybrid") if r["fallback"] == "low_confidence"]
    assert records and all(r["served_by"] == "teacher" and r["confidence"] < 1.0 for r in records)


def test_hybrid_survives_a_killed_student_replica_without_a_5xx(served):
    import ray

    client = served.client("hybrid")
    served.admin("hybrid", "PUT", "live", json={"min_confidence": 0.0})
    replicas = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::hybrid#Student-student")
    ]
    assert len(replicas) == 1, replicas

    def kill() -> None:
        time.sleep(0.5)
        ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)

    killer = threading.Thread(target=kill)
    killer.start()
    results = many(lambda t: ask(client, t)[0], TEXTS[:48], workers=8)
    killer.join()
    assert len(results) == 48  # every request answered 200 (an error would have raised)
    reasons = Counter(h.get(FALLBACK) for h in results)
    assert reasons.get("error", 0) + reasons.get("timeout", 0) >= 1, reasons
    assert {h[TARGET_HEADER] for h in results if h.get(FALLBACK)} == {"teacher"}
    deadline = time.monotonic() + 120  # Serve starts a new student replica
    while True:
        try:
            assert ask(client, "back?", model="student")[0][TARGET_HEADER] == "student"
            break
        except openai.APIStatusError:
            assert time.monotonic() < deadline, "the student replica did not come back"
            time.sleep(1)


def test_the_teachers_budget_is_the_shared_quota_and_hybrid_keeps_the_student_then(served):
    client = served.client("hybrid")
    spent = None
    for text in TEXTS * 2:
        try:
            ask(client, text, model="teacher")
        except openai.RateLimitError as e:
            spent = e
            break
    assert spent is not None and spent.body["code"] == "insufficient_quota"
    served.admin("hybrid", "PUT", "live", json={"min_confidence": 1.0})
    headers, completion = ask(client, TEXTS[0])
    assert headers[TARGET_HEADER] == "student" and completion.choices[0].message.content
    assert headers[FALLBACK] == "low_confidence; teacher failed"


# ------------------------------------------------------------------------ log, next round
def test_the_request_log_is_the_next_rounds_log(served, e2e_run, tmp_path):
    """The canary's request log, read by the next round's generate stage: one row per
    record; a teacher's answer kept, a student's answered by the teacher again."""
    from ray_pipeline.pipeline import run_stages

    files = log_files(served.logs["canary"])
    records = served.records("canary")
    answered = [r for r in records if r["status"] == 200]
    logs = "[" + ", ".join(f"{{path: {f}}}" for f in files) + "]"
    cfg = load_config(
        ROOT / "configs/quickstart.yaml",
        [f"run.output_dir={tmp_path}", f"data.logs={logs}", "data.seeds=null"],
    )
    run = run_stages(cfg, ["generate"], "next-round")
    gen = load_report(run.dir)["generate"]
    assert gen["rows"] == len(records) and gen["status"] == {"ok": len(records)}
    from_teacher = sum(r["served_by"] == "teacher" for r in answered)
    # Every student answer was asked of the teacher again (repeated inputs: from the cache).
    asked = gen["quota"]["calls"] + gen["quota"]["cache_hits"]
    assert from_teacher > 0 and asked >= len(records) - from_teacher


def test_prometheus_metrics_are_exported(served):
    """Serve's metrics API: the router's metrics reach the node's Prometheus endpoint."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = ("distill_requests", "distill_request_latency_ms", "distill_fallback_rate")
    # The node's exporter can take several seconds to answer a scrape on a busy machine
    # (CI timed out at httpx's 5 s default): a slow scrape is retried until the deadline.
    deadline = time.monotonic() + 90
    text = ""
    while True:
        try:
            text = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        except httpx2.TimeoutException as e:
            text = f"scrape timed out: {e}"
        if all(w in text for w in wanted) or time.monotonic() > deadline:
            break
        time.sleep(1)
    for w in wanted:
        assert w in text, w


def test_replicas_run_throughput_optimized_beside_the_apps_own_environment(served):
    """serve.throughput_optimized (on by default) reaches every deployment's runtime_env
    beside the operator's own env_vars (which reach the replicas: the other tests pass
    auth); user code keeps its own thread."""
    from ray.serve.context import _get_global_client

    from ray_pipeline.serving.args import THROUGHPUT_OPTIMIZED_ENV

    details = _get_global_client().get_serve_details()
    deployments = details["applications"]["canary"]["deployments"]
    assert {"Router", "RouterControl", "Teacher", "Student-student"} <= set(deployments)
    for name, d in deployments.items():
        env = d["deployment_config"]["ray_actor_options"]["runtime_env"]["env_vars"]
        assert env["DISTILL_TEST_SERVE_KEY"] == KEY, name
        assert env.items() >= THROUGHPUT_OPTIMIZED_ENV.items(), name


# ------------------------------------------------------------------- students in the router
def test_students_in_the_router_answer_as_their_deployment_does(served):
    """serve.student_placement=router: no student deployment, the router's replica reserves
    the router's and the student's CPUs, and each student (two adapters on one base, in the
    router's process) answers what the same student answers from its own deployment."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployments = details["applications"]["inrouter"]["deployments"]
    assert set(deployments) == {"Router", "RouterControl", "Teacher"}
    options = deployments["Router"]["deployment_config"]["ray_actor_options"]
    assert options["num_cpus"] == pytest.approx(0.05)  # serve.router + serve.student
    inrouter, canary = served.client("inrouter", key="none"), served.client("canary")
    for model in ("student", "student-v0"):
        for text in TEXTS[:5]:
            h, here = ask(inrouter, text, model=model)
            _, there = ask(canary, text, model=model)
            assert h[TARGET_HEADER] == model
            assert here.choices[0].message.content == there.choices[0].message.content
            assert here.usage == there.usage
    results = many(lambda t: ask(inrouter, t), TEXTS[:120])
    split = Counter(h[TARGET_HEADER] for h, _ in results)
    assert set(split) == {"student", "student-v0"} and min(split.values()) > 30, split
    chunks = list(
        inrouter.chat.completions.create(
            model="student", messages=PROMPT.messages(TEXTS[0]), max_tokens=16, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ask(inrouter, TEXTS[0], model="student")[1].choices[0].message.content
    by_id = {r["id"]: r for r in served.records("inrouter")}
    assert all(by_id[c.id]["served_by"] == h[TARGET_HEADER] for h, c in results)
