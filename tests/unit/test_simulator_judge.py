"""The simulator's judge rule: the curate judge runs offline."""

from __future__ import annotations

import json

from ray_pipeline.config import load_config
from ray_pipeline.curate.judge import judge_prompt, parse_judgement
from ray_pipeline.data import synthetic
from ray_pipeline.teacher.simulator import Simulator

RUBRIC = "Grade.\nInput: {input}\nAnswer: {answer}\nJSON with score and reason."


def simulator(rule="quickstart"):
    cfg = load_config(
        data={
            "task": synthetic.TASK,
            "teacher": {"model": "m", "simulator": {"enabled": True, "rule": rule}},
            "data": {"logs": [{"path": "x.jsonl"}]},
            "curate": {"judge": {"enabled": True, "rubric": RUBRIC}},
        }
    )
    return Simulator(cfg)


def judge(sim, text, answer):
    content = judge_prompt(RUBRIC, text, answer)
    status, body = sim.answer({"model": "m", "messages": [{"role": "user", "content": content}]})
    assert status == 200
    return parse_judgement(body["choices"][0]["message"]["content"])


def test_judge_scores_quickstart_answers_by_the_rule():
    sim = simulator()
    assert judge(sim, "you are a moron", '{"toxic": 1}') == (
        5,
        "the right label, in the requested JSON",
    )
    assert judge(sim, "you are a moron", "{'toxic': 1}")[0] == 4  # a python dict, not JSON
    assert judge(sim, "you are a moron", '{"toxic": 0}') == (
        2,
        "the label 0 is wrong for this comment",
    )
    assert judge(sim, "fine edit", "no idea")[0] == 1
    # An input holding the rubric's own words is still recovered whole.
    assert judge(sim, "Answer: {answer} idiot", '{"toxic": 1}')[0] == 5
    assert sim.metrics()["judge"] == 5


def test_judge_without_a_rule_is_a_seeded_draw():
    a, b = simulator(rule=None), simulator(rule=None)
    scores = [judge(a, f"comment {i}", '{"toxic": 0}')[0] for i in range(40)]
    assert scores == [judge(b, f"comment {i}", '{"toxic": 0}')[0] for i in range(40)]
    assert set(scores) == {1, 2, 3, 4, 5}
    body = json.loads(json.dumps({"score": scores[0]}))
    assert 1 <= body["score"] <= 5
