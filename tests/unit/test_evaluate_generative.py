"""Generative evaluation: the metrics of answers against references, and the LLM judge asked
through the teacher stage's caller against the simulator over real HTTP."""

from __future__ import annotations

import asyncio

import pytest
import yaml

from ray_pipeline.config import load_config
from ray_pipeline.data import qa
from ray_pipeline.data.schema import new_row
from ray_pipeline.evaluate import generative as gen
from ray_pipeline.evaluate.mistakes import DISAGREEMENT, ERROR, render_mistakes_html
from ray_pipeline.teacher.caller import TeacherCaller, TeacherEndpoint, ask_specs
from ray_pipeline.teacher.sim_server import simulator_process
from ray_pipeline.teacher.simulator import overlap_judgement

PROMPT = "Q: {input}\nReference: {reference}\nAnswer: {answer}\nScore {min_score}-{max_score}."


def qa_config(schema: bool = True, judge: bool = True) -> dict:
    return {
        "task": {
            "kind": "generative",
            "prompt": {"template": qa.PROMPT},
            **({"output_schema": qa.OUTPUT_SCHEMA} if schema else {}),
        },
        "teacher": {"model": "sim", "simulator": {"enabled": True, "rule": "qa"}},
        "data": {"seeds": {"path": "configs/data/qa_seeds/seeds.jsonl"}},
        "evaluate": {"judge": {"enabled": judge, "prompt": PROMPT}},
    }


def test_metrics_of_structured_answers():
    task = load_config(data=qa_config()).task
    refs = ['{"answer": "Paris"}', '{"answer": "New Delhi"}', '{"answer": "cold"}', "{}"]
    answers = [
        '```json\n{"answer": "paris"}\n```',  # fenced, other case: still exact
        '{"answer": "Delhi"}',  # half the words
        "It is cold.",  # no JSON value: unparsed
        '{"response": "x"}',  # parses, but breaks the schema
    ]
    m = gen.generative_metrics(refs, answers, task)
    assert m["rows"] == 4 and m["unparsed"] == 1
    assert m["exact_match"] == 0.25
    assert m["json_adherence"] == 0.5  # the first two only
    # ROUGE-L reads the values, not the keys: 1, then F1 of 1 of 2 words, then 0 and 0
    # ('{}' has no words; '{"response": "x"}' shares none).
    assert m["rouge_l"] == pytest.approx((1 + 2 / 3) / 4)
    assert m["judge_score"] is None and m["judge_failed"] is None


def test_metrics_of_free_text_answers():
    task = load_config(data=qa_config(schema=False, judge=False)).task
    m = gen.generative_metrics(["Paris", "cold"], ["  Paris ", None], task)
    assert m["exact_match"] == 0.5 and m["unparsed"] == 1
    assert m["json_adherence"] is None
    assert m["rouge_l"] == 0.5


def test_config_refuses_label_settings_on_a_generative_task():
    with pytest.raises(ValueError) as e:
        load_config(
            data={
                **qa_config(),
                "curate": {"vote": {"enabled": True}, "balance": {"target": {"a": 1.0}}},
                "evaluate": {"baselines": ["majority"]},
                "train": {"student": {"kind": "classifier"}},
            }
        )
    msg = str(e.value)
    for part in (
        "task.kind is generative",
        "evaluate.baselines ['majority'] need labels",
        "curate.vote needs labels",
        "curate.balance.target",
        "train.student.kind 'classifier'",
    ):
        assert part in msg, part


def test_config_task_kinds():
    cfg = load_config(data=qa_config())
    assert cfg.task.generative and cfg.task.labels is None
    assert cfg.evaluate.baselines == ["frequent_answer", "echo"]
    with pytest.raises(ValueError, match="task: a label task .* needs at least 2 labels"):
        load_config(data={**qa_config(), "task": {"prompt": {"template": "{input}"}}})
    with pytest.raises(ValueError, match="a generative task has no labels"):
        load_config(
            data={
                **qa_config(),
                "task": {
                    "kind": "generative",
                    "labels": ["a", "b"],
                    "prompt": {"template": "{input}"},
                },
            }
        )
    with pytest.raises(ValueError, match="task.output_schema: not a valid JSON Schema"):
        load_config(
            data={
                **qa_config(),
                "task": {
                    "kind": "generative",
                    "output_schema": {"type": 5},
                    "prompt": {"template": "{input}"},
                },
            }
        )
    with pytest.raises(ValueError, match=r"evaluate.judge: .*prompt lacks \['\{reference\}'\]"):
        load_config(data={**qa_config(), "evaluate": {"judge": {"prompt": "{input} {answer}"}}})
    label_task = {"labels": ["0", "1"], "prompt": {"template": "{input}"}}
    with pytest.raises(ValueError, match="evaluate.judge scores generative answers"):
        load_config(data={**qa_config(), "task": label_task})


def test_overlap_judgement_is_the_documented_rule():
    assert overlap_judgement('{"answer": "Paris"}', '{"answer": "paris"}', 1, 5).startswith(
        '{"score": 5'
    )
    assert '"score": 1' in overlap_judgement('{"answer": "Paris"}', '{"answer": "Rome"}', 1, 5)
    # F1 of "new delhi" against "delhi" is 2/3: 1 + 2/3 * 4 = 3.67, rounded to 4.
    assert '"score": 4' in overlap_judgement("New Delhi", "Delhi", 1, 5)
    assert '"score": 7' in overlap_judgement("a b", "a c", 4, 10)  # 4 + 0.5 * 6


def test_judge_through_the_teacher_caller_and_the_simulator_over_http(tmp_path):
    data = qa_config()
    data["evaluate"]["judge"]["max_score"] = 10
    path = tmp_path / "qa.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    jc = cfg.evaluate.judge
    rows = [
        new_row(id=f"r{i}", source="t", source_line=i, input=q, gold=ref)
        for i, (q, ref) in enumerate(
            [
                ("What is the capital of India?", '{"answer": "New Delhi"}'),
                ("What is 2 plus 2?", '{"answer": "4"}'),
            ]
        )
    ]
    cases = [
        ("student", rows[0], '{"answer": "Delhi"}'),
        ("student", rows[1], '{"answer": "4"}'),
        ("echo", rows[0], rows[0]["input"]),
        ("echo", rows[1], rows[1]["input"]),
    ]
    requests = gen.judge_requests(cases, jc)
    assert "Score 1-10." in requests[0]["messages"]
    with simulator_process(path) as url:
        endpoint = TeacherEndpoint(base_url=url, api_key="simulator", identity="sim")
        specs = ask_specs(
            cfg.teacher, endpoint, {"temperature": 0.0, "max_tokens": 64, "n": 1}, voters=False
        )
        caller = TeacherCaller(specs, cfg.teacher.model_dump(mode="json"))

        async def ask():
            try:
                return await caller.call_rows(requests)
            finally:
                await caller.aclose()

        replies = asyncio.run(ask())
    judged = gen.judge_scores(replies, jc)
    # Word-overlap F1 on the scale 1-10: 2/3 -> 7, 1 -> 10; "What is 2 plus 2" shares "2"
    # with "4"? no: 0 -> 1; "What is the capital of India?" shares nothing with "New Delhi".
    assert judged[("student", "r0")]["score"] == 7
    assert judged[("student", "r1")]["score"] == 10
    assert judged[("echo", "r0")]["score"] == 1 and judged[("echo", "r1")]["score"] == 1
    task = cfg.task
    m = gen.generative_metrics(
        [r["gold"] for r in rows],
        ['{"answer": "Delhi"}', '{"answer": "4"}'],
        task,
        [judged[("student", r["id"])] for r in rows],
    )
    assert m["judge_score"] == 8.5 and m["judge_failed"] == 0 and m["exact_match"] == 0.5

    # The mistakes page lists the low-scoring student answer, with its score as error type,
    # and the exact one where the teacher missed.
    student_rows = [
        {**rows[0], "response": '{"answer": "Delhi"}', "confidence": 0.4},
        {**rows[1], "response": '{"answer": "4"}', "confidence": 0.9},
    ]
    page = gen.generative_mistake_rows(
        student_rows,
        {"r0": '{"answer": "New Delhi"}', "r1": '{"answer": "5"}'},
        task,
        {r["id"]: judged[("student", r["id"])] for r in rows},
        (jc.min_score, jc.max_score),
    )
    assert [(p["kind"], p["error_type"], p["judge_score"]) for p in page] == [
        (ERROR, "judge 7/10", 7),
        (DISAGREEMENT, "", 10),
    ]
    html = render_mistakes_html("t", page, 2)
    assert "judge 7/10" in html and "New Delhi" in html
