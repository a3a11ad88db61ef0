from __future__ import annotations

import json

from ray_pipeline.config import SeedsSection
from ray_pipeline.data import synthetic
from ray_pipeline.teacher.parse import parse_answer, parse_list
from ray_pipeline.teacher.prompts import Prompt
from ray_pipeline.teacher.simulator import Simulator, SimulatorSpec, load_replay

PROMPT = Prompt(synthetic.PROMPT)


def ask(sim, text, **body):
    return sim.answer({"model": "m", "messages": PROMPT.messages(text), **body})


def test_rule_answers_follow_the_rule_with_errors():
    sim = Simulator(SimulatorSpec(rule="quickstart", error_rate=0.0, prompts=[PROMPT]))
    status, body = ask(sim, "You are a moron")
    assert status == 200
    assert parse_answer(body["choices"][0]["message"]["content"], "toxic", ["0", "1"], {}).label == "1"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] > 0
    status, body = ask(sim, "This article is fine", n=3)
    assert [parse_answer(c["message"]["content"], "toxic", ["0", "1"], {}).label for c in body["choices"]] == ["0"] * 3


def test_replay_by_input_text(jigsaw_dir):
    table = load_replay(jigsaw_dir / "test.balanced.gpt-4.responses.csv", "comment_text", "simple_prompt")
    assert len(table) == 400
    prompt = Prompt((jigsaw_dir / "prompt.simple.txt").read_text(), "%s")
    sim = Simulator(SimulatorSpec(replay=table, prompts=[prompt]))
    comment, recorded = next(iter(table.items()))
    status, body = sim.answer({"messages": prompt.messages(comment)})
    assert status == 200 and body["choices"][0]["message"]["content"] == recorded
    status, body = sim.answer({"messages": prompt.messages("never seen")})
    assert status == 404 and "no recorded response" in body["error"]["message"]


def test_every_jigsaw_responses_file_loads_as_a_replay_table(jigsaw_dir):
    for path in sorted(jigsaw_dir.glob("*.responses.csv")):
        assert load_replay(path, "comment_text", "simple_prompt"), path


def test_bad_requests_are_400():
    sim = Simulator(SimulatorSpec(rule="quickstart"))
    assert sim.answer({"messages": []})[0] == 400
    assert sim.answer({"messages": [{"role": "assistant", "content": "x"}]})[0] == 400
    assert sim.answer({"messages": PROMPT.messages("x"), "n": 99})[0] == 400


def test_seed_expansion_requests():
    tmpl = SeedsSection(path="s.jsonl").template
    sim = Simulator(SimulatorSpec(rule="quickstart", expansion_template=tmpl))
    prompt = tmpl.format(task="toxicity", examples="- a\n- b", n=7)
    status, body = sim.answer({"messages": [{"role": "user", "content": prompt}], "seed": 1})
    items = parse_list(body["choices"][0]["message"]["content"])
    assert status == 200 and len(items) == 7 and len(set(items)) == 7
    _, again = sim.answer({"messages": [{"role": "user", "content": prompt}], "seed": 2})
    assert json.loads(again["choices"][0]["message"]["content"]) != items  # a new seed, new inputs
