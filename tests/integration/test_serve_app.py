"""The Serve router app deployed by import path on local Ray, with the e2e run's student and
the simulator as teacher, called with the real openai client."""

from __future__ import annotations

import contextlib
import json

import openai
import pytest

from ray_pipeline.data import synthetic
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.run_state import load_report
from ray_pipeline.serving.stage import APP_IMPORT_PATH, TARGET_HEADER, deploy, free_port, load_app
from ray_pipeline.teacher.sim_server import simulator_process
from tests.integration.conftest import write_sim_config

pytestmark = pytest.mark.integration
PROMPT = Prompt(synthetic.PROMPT)


@pytest.fixture(scope="module")
def router(ray_local, e2e_run, tmp_path_factory):
    """Two apps on one Serve instance: a 50/50 split with a healthy teacher, and a teacher
    that always fails (the simulator answering 500)."""
    from ray import serve

    tmp = tmp_path_factory.mktemp("serve")
    sims = contextlib.ExitStack()
    good = write_sim_config(tmp / "good.yaml", rule="quickstart")
    bad = write_sim_config(tmp / "bad.yaml", rate_500=1.0)
    good_url = sims.enter_context(simulator_process(good))
    bad_url = sims.enter_context(simulator_process(bad))
    port = free_port("127.0.0.1")
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    checkpoint = load_report(e2e_run)["evaluate"]["checkpoint"]
    base = {"checkpoint": checkpoint, "teacher_model": "sim-teacher", "num_cpus": 0.1, "seed": 7}
    log = tmp / "requests.jsonl"
    deploy(
        load_app(
            APP_IMPORT_PATH,
            {
                **base,
                "teacher_base_url": good_url,
                "weights": {"student": 0.5, "teacher": 0.5},
                "request_log": str(log),
            },
        ),
        "split",
        route_prefix="/split",
    )
    deploy(
        load_app(
            APP_IMPORT_PATH,
            {
                **base,
                "teacher_base_url": bad_url,
                "weights": {"student": 0.0, "teacher": 1.0},
                "timeout_s": 20,
            },
        ),
        "broken",
        route_prefix="/broken",
    )
    clients = {
        name: openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/{name}/v1", api_key="none", max_retries=0
        )
        for name in ("split", "broken")
    }
    yield clients, log
    serve.shutdown()
    sims.close()


def ask(client, text, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model=kw.pop("model", "auto"), messages=PROMPT.messages(text), max_tokens=16, **kw
    )
    return raw.headers[TARGET_HEADER], raw.parse()


def test_split_answers_from_both_targets_and_says_which(router):
    clients, log = router
    seen = []
    for text in synthetic.generate_comments(30, seed=21):
        target, completion = ask(clients["split"], text)
        assert completion.model == target and completion.choices[0].message.content
        seen.append(target)
    assert 5 <= seen.count("student") <= 25 and seen.count("student") + seen.count("teacher") == 30
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["served_by"] for r in records][-30:] == seen
    assert all(
        r["request"]["messages"][0]["role"] == "user" and r["response"]["choices"] for r in records
    )


def test_model_field_picks_the_target(router):
    clients, _ = router
    assert {ask(clients["split"], "what a clown", model="teacher")[0] for _ in range(5)} == {
        "teacher"
    }
    assert {ask(clients["split"], "what a clown", model="student")[0] for _ in range(5)} == {
        "student"
    }
    models = clients["split"].models.list()
    assert {m.id for m in models.data} == {"auto", "student", "teacher"}


def test_bad_requests_get_400_with_a_message(router):
    clients, _ = router
    with pytest.raises(openai.BadRequestError, match="messages"):
        clients["split"].chat.completions.create(model="auto", messages=[])
    with pytest.raises(openai.BadRequestError, match="stream=true is not supported"):
        clients["split"].chat.completions.create(
            model="auto", messages=PROMPT.messages("x"), stream=True
        )


def test_a_failing_teacher_gives_502_with_the_reason(router):
    clients, _ = router
    with pytest.raises(openai.InternalServerError) as exc:
        ask(clients["broken"], "hello")
    assert exc.value.status_code == 502
    assert "target 'teacher' failed: TeacherCallError" in str(exc.value)
    assert exc.value.response.headers[TARGET_HEADER] == "teacher"
