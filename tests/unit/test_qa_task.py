"""The built-in synthetic Q&A task and the simulator's qa rule (teacher, expansion, judge)."""

from __future__ import annotations

import json

from ray_pipeline.config import load_config
from ray_pipeline.curate.judge import judge_prompt, parse_judgement
from ray_pipeline.data import qa
from ray_pipeline.teacher.parse import parse_generative
from ray_pipeline.teacher.simulator import Simulator

RUBRIC = "Grade.\nInput: {input}\nAnswer: {answer}\nJSON with score and reason."


def simulator(**sim) -> Simulator:
    cfg = load_config(
        data={
            "task": {
                "kind": "generative",
                "prompt": {"template": qa.PROMPT},
                "output_schema": qa.OUTPUT_SCHEMA,
            },
            "teacher": {"model": "m", "simulator": {"enabled": True, "rule": "qa", **sim}},
            "data": {"seeds": {"path": "configs/data/qa_seeds/seeds.jsonl"}},
            "curate": {"judge": {"enabled": True, "rubric": RUBRIC}},
        }
    )
    return Simulator(cfg)


def ask(sim: Simulator, content: str) -> str:
    status, body = sim.answer({"model": "m", "messages": [{"role": "user", "content": content}]})
    assert status == 200
    return body["choices"][0]["message"]["content"]


def test_true_answers():
    assert qa.true_answer("What is the capital of France?") == "Paris"
    assert qa.true_answer("Name the capital city of mexico.") == "Mexico City"
    assert qa.true_answer("How much is 30 + 4?") == "34"
    assert qa.true_answer("Add 25 and 14.") == "39"
    assert qa.true_answer("Give the antonym of the word cold.") == "hot"
    assert qa.true_answer("Which word means the opposite of loud?") == "quiet"
    assert qa.true_answer("Who wrote Hamlet?") == qa.UNKNOWN


def test_simulated_teacher_answers_by_the_rule_with_errors_and_drift():
    sim = simulator(error_rate=0.2)
    questions = qa.generate_questions(300, seed=5)
    answers = [ask(sim, qa.PROMPT.replace("{input}", q)) for q in questions]
    values = [parse_generative(a, qa.OUTPUT_SCHEMA).output for a in answers]
    prose = [a for a, v in zip(answers, values, strict=True) if v is None]
    assert 0.005 < len(prose) / len(values) < 0.07  # PROSE_SHARE 0.03: no JSON value
    assert all(a.startswith("The answer is ") for a in prose)
    parsed = [(q, v) for q, v in zip(questions, values, strict=True) if v is not None]
    assert all(isinstance(v, dict) for _, v in parsed)  # the others hold a JSON object
    drifted = [v for _, v in parsed if "answer" not in v]
    assert 0.02 < len(drifted) / len(parsed) < 0.1 and all("response" in v for v in drifted)
    kept = [(q, v["answer"]) for q, v in parsed if "answer" in v]
    wrong = sum(a != qa.true_answer(q) for q, a in kept) / len(kept)
    assert 0.12 < wrong < 0.28  # error_rate 0.2
    assert answers == [
        ask(simulator(error_rate=0.2), qa.PROMPT.replace("{input}", q)) for q in questions
    ]


def test_simulated_expansion_writes_new_questions():
    sim = simulator()
    prompt = (
        "Here are examples of inputs for the task 'task':\n- What is 2 plus 2?\n\n"
        "Write 7 new, different inputs in the same style. Answer with a JSON list of strings only."
    )
    new = json.loads(ask(sim, prompt))
    assert len(new) == 7 and all(qa.true_answer(q) != qa.UNKNOWN for q in new)


def test_simulated_curate_judge_by_the_qa_rule():
    sim = simulator()
    q = "What is the capital of Peru?"

    def judge(answer: str) -> int:
        return parse_judgement(ask(sim, judge_prompt(RUBRIC, q, answer)))[0]

    assert judge('{"answer": "Lima"}') == 5
    assert judge('```json\n{"answer": "Lima"}\n```') == 4
    assert judge('{"answer": "Rome"}') == 2
    assert judge("Lima, I think") == 1


def test_committed_qa_files_match_the_generator(tmp_path, root):
    paths = qa.write_qa_files(tmp_path)
    for name, path in paths.items():
        committed = root / "configs" / "data" / "qa_seeds" / path.name
        assert committed.read_text() == path.read_text(), name
