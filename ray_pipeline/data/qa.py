"""The built-in synthetic Q&A task: short questions with one right short answer.

Three kinds of question, each answered by a rule (the truth the simulator's ``qa`` rule
answers by, wrong on a configurable share): the capital of a country, the sum of two small
numbers, the opposite of a word. The teacher answers in JSON, ``{"answer": "Paris"}``, in
varied formatting (fenced or bare); a small share of answers drift from the format, by
question (so every run alike): prose with no JSON in it (PROSE_SHARE: the row fails to parse)
and JSON under another key (DRIFT_SHARE: an output schema catches it). A question the rule does not know gets "unknown".

The offline generative example (configs/qa_seeds.yaml) expands a few hand-written questions
(configs/data/qa_seeds/seeds.jsonl) into new ones through the simulator, which answers them.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ray_pipeline.data.synthetic import distinct, stable_fraction

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Ireland": "Dublin",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Australia": "Canberra",
    "Turkey": "Ankara",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "early": "late",
    "light": "dark",
    "open": "closed",
    "full": "empty",
    "happy": "sad",
    "up": "down",
    "old": "new",
    "hard": "soft",
    "wet": "dry",
    "loud": "quiet",
    "rich": "poor",
    "strong": "weak",
    "high": "low",
}
CAPITAL_FRAMES = [
    "What is the capital of {x}?",
    "Which city is the capital of {x}?",
    "Name the capital city of {x}.",
]
SUM_FRAMES = ["What is {a} plus {b}?", "How much is {a} + {b}?", "Add {a} and {b}."]
OPPOSITE_FRAMES = [
    "What is the opposite of {x}?",
    "Give the antonym of the word {x}.",
    "Which word means the opposite of {x}?",
]

_CAPITAL = re.compile(r"capital(?: city)? of (.+?)[?.]?$", re.I)
_SUM = re.compile(r"(\d+)\s*(?:plus|\+|and)\s*(\d+)", re.I)
_OPPOSITE = re.compile(r"(?:opposite of|antonym of the word)\s+(\w+)", re.I)
UNKNOWN = "unknown"

PROMPT = (
    "Answer the question with a short answer. Reply in JSON only: "
    '{"answer": "<short answer>"}\n\nQuestion: {input}'
)
# The schema of the answers (configs/qa_seeds.yaml spells it out).
OUTPUT_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "minLength": 1}},
    "required": ["answer"],
    "additionalProperties": False,
}
# Shares of the teacher's answers in prose (no JSON) and under another key than "answer".
PROSE_SHARE = 0.03
DRIFT_SHARE = 0.05


def true_answer(question: str) -> str:
    """The rule's answer to a question ("unknown" when the rule does not know it)."""
    q = question.strip()
    if m := _CAPITAL.search(q):
        country = m.group(1).strip()
        for name, capital in CAPITALS.items():
            if name.lower() == country.lower():
                return capital
        return UNKNOWN
    if m := _SUM.search(q):
        return str(int(m.group(1)) + int(m.group(2)))
    if m := _OPPOSITE.search(q):
        word = m.group(1).lower()
        both = {**OPPOSITES, **{v: k for k, v in OPPOSITES.items()}}
        return both.get(word, UNKNOWN)
    return UNKNOWN


def _wrong(answer: str, question: str, seed: int) -> str:
    """A plausible wrong answer of the same kind."""
    rng = random.Random(f"wrong:{seed}:{question}")
    if answer.isdigit():
        return str(int(answer) + rng.choice([-2, -1, 1, 2, 10]))
    pool = list(CAPITALS.values()) if answer in CAPITALS.values() else list(OPPOSITES.values())
    return rng.choice([x for x in pool if x != answer] or [UNKNOWN])


def teacher_answer(question: str, error_rate: float, seed: int = 0, sample: int = 0) -> str:
    """What the simulated teacher answers: the rule, wrong on a stable `error_rate` share."""
    answer = true_answer(question)
    if answer != UNKNOWN and stable_fraction("error", seed, sample, question) < error_rate:
        return _wrong(answer, question, seed + sample)
    return answer


def format_answer(answer: str, question: str) -> str:
    """Teacher-style JSON, varied per question: fenced, bare, or off the format: prose
    (PROSE_SHARE) or under the wrong key (DRIFT_SHARE)."""
    style = stable_fraction("qa-style", question)
    if style < PROSE_SHARE:
        return f"The answer is {answer}."
    if style < PROSE_SHARE + DRIFT_SHARE:
        return json.dumps({"response": answer})
    if style < 0.5:
        return f'```json\n{{"answer": {json.dumps(answer)}}}\n```'
    return json.dumps({"answer": answer})


def make_question(rng: random.Random) -> str:
    kind = rng.choice(["capital", "sum", "opposite"])
    if kind == "capital":
        return rng.choice(CAPITAL_FRAMES).format(x=rng.choice(list(CAPITALS)))
    if kind == "sum":
        return rng.choice(SUM_FRAMES).format(a=rng.randint(1, 40), b=rng.randint(1, 40))
    word = rng.choice([*OPPOSITES, *OPPOSITES.values()])
    return rng.choice(OPPOSITE_FRAMES).format(x=word)


def generate_questions(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """`n` distinct questions (none in `exclude`, case aside)."""
    rng = random.Random(seed)
    return distinct(n, lambda: make_question(rng), exclude, "questions")


SEEDS = [
    "What is the capital of France?",
    "Which city is the capital of Japan?",
    "What is 12 plus 7?",
    "How much is 30 + 4?",
    "What is the opposite of hot?",
    "Give the antonym of the word early.",
    "Name the capital city of Kenya.",
    "Which word means the opposite of loud?",
]


def write_qa_files(out_dir: str | Path, n_test: int = 40, seed: int = 1) -> dict[str, Path]:
    """Write the generative example's inputs: the hand-written seed questions and a test set
    of other questions with their right answers as references ({"answer": ...})."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test = generate_questions(n_test, seed, exclude=set(SEEDS))
    paths = {"seeds": out / "seeds.jsonl", "test": out / "test.jsonl"}
    paths["seeds"].write_text("".join(json.dumps({"input": q}) + "\n" for q in SEEDS))
    paths["test"].write_text(
        "".join(
            json.dumps({"input": q, "reference": {"answer": true_answer(q)}}) + "\n" for q in test
        )
    )
    return paths
