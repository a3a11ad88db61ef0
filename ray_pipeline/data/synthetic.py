"""The built-in synthetic quickstart task: is a short talk-page comment toxic?

A comment is toxic exactly when it contains one of the insult words below; everything else
is built from neutral (and some critical-but-civil) phrases. The rule is the gold label; the
teacher simulator answers by the same rule but gets a configurable share of answers wrong, so a
student trained on teacher labels can be checked against clean gold labels.

``write_quickstart_files`` writes the quickstart's inputs (logs, seeds, test set); they are
committed under configs/data/quickstart/ and a test checks they match this generator.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

INSULTS = [
    "idiot",
    "moron",
    "stupid",
    "pathetic",
    "loser",
    "clown",
    "garbage",
    "worthless",
    "dumb",
    "fool",
]
SUBJECTS = [
    "this article",
    "your edit",
    "the reviewer",
    "that admin",
    "the lead section",
    "his comment",
    "her reply",
    "the infobox",
    "this source",
    "the last revert",
    "our discussion",
    "the new draft",
]
VERBS = ["is", "looks", "seems", "reads as", "sounds"]
NEUTRAL = [
    "fine",
    "helpful",
    "well sourced",
    "interesting",
    "too long",
    "unclear",
    "outdated",
    "accurate",
    "detailed",
    "a bit biased",
    "wrong on the dates",
    "hard to follow",
    "much better now",
    "confusing",
]
OPENERS = ["", "", "hey,", "honestly,", "well,", "sorry but", "thanks,", "ok so"]
TAILS = [
    "",
    "",
    "please check the sources",
    "see the talk page",
    "lol",
    "again",
    "I think",
    "per the policy",
    "for now",
    "as usual",
    "if you ask me",
]
INSULT_FRAMES = [
    "you are a {w}",
    "what a {w}",
    "only a {w} would write that",
    "stop being a {w}",
    "{w}",
    "such a {w} move",
]
INSULT_ADJ_FRAMES = ["this is {w}", "so {w}", "{w} edit"]
_ADJ_INSULTS = {"stupid", "pathetic", "worthless", "dumb"}

_INSULT_RE = re.compile(r"\b(" + "|".join(INSULTS) + r")\b", re.I)

PROMPT = (
    "Is the following talk-page comment toxic? Answer in JSON with the key 'toxic' "
    "set to 1 if it is toxic, otherwise 0.\n\nComment: {input}"
)


# The task section of a run config for this task (configs/quickstart.yaml spells it out).
TASK = {
    "name": "toxicity",
    "prompt": {"template": PROMPT},
    "label_key": "toxic",
    "labels": ["0", "1"],
}


def true_label(text: str) -> str:
    """The gold rule: '1' when the comment contains an insult word, else '0'."""
    return "1" if _INSULT_RE.search(text) else "0"


def make_comment(rng: random.Random, toxic: bool) -> str:
    parts = [rng.choice(OPENERS), rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(NEUTRAL)]
    if toxic:
        w = rng.choice(INSULTS)
        frame = rng.choice(
            INSULT_ADJ_FRAMES if w in _ADJ_INSULTS and rng.random() < 0.5 else INSULT_FRAMES
        )
        insult = frame.format(w=w)
        parts = [*parts, ",", insult] if rng.random() < 0.5 else [insult, ",", *parts]
    parts.append(rng.choice(TAILS))
    text = " ".join(p for p in parts if p).replace(" ,", ",")
    return text[0].upper() + text[1:]


def stable_fraction(*keys: object) -> float:
    """A deterministic number in [0, 1) from the keys (same keys, same number, any process)."""
    digest = hashlib.sha256("\x00".join(map(str, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def error_draw(text: str, seed: int = 0, sample: int = 0) -> float:
    """The simulated teacher's stable draw for one answer: it is wrong when the draw is below
    its error rate (``teacher_label``); its confidence comes from the same draw
    (``simulator.label_confidence``)."""
    return stable_fraction("error", seed, sample, text)


def teacher_label(text: str, error_rate: float, seed: int = 0, sample: int = 0) -> str:
    """What the simulated teacher answers: the rule, wrong on a stable `error_rate` share."""
    label = true_label(text)
    if error_draw(text, seed, sample) < error_rate:
        return "0" if label == "1" else "1"
    return label


def format_answer(label: str, text: str, key: str = "toxic") -> str:
    """Teacher-style formatting, varied per input like real teachers: fenced JSON, bare JSON,
    or a fenced python dict."""
    style = stable_fraction("style", text)
    if style < 0.5:
        return f'```json\n{{\n  "{key}": {label}\n}}\n```'
    if style < 0.8:
        return f'{{"{key}": {label}}}'
    return f"```python\n{{'{key}': {label}}}\n```"


def generate_comments(
    n: int, seed: int, toxic_share: float = 0.5, exclude: set[str] = frozenset()
) -> list[str]:
    """`n` distinct comments (none in `exclude`), about `toxic_share` of them toxic."""
    rng = random.Random(seed)
    return distinct(n, lambda: make_comment(rng, rng.random() < toxic_share), exclude, "comments")


def distinct(n: int, make: Callable[[], str], exclude: set[str], what: str) -> list[str]:
    """`n` texts from `make()` that differ from each other and from `exclude`, case aside;
    a ValueError when `make` cannot find that many in n * 200 draws."""
    seen = {t.lower() for t in exclude}
    out: list[str] = []
    for _ in range(n * 200):
        if len(out) == n:
            break
        t = make()
        if t.lower() not in seen:
            seen.add(t.lower())
            out.append(t)
    if len(out) < n:
        raise ValueError(f"could only make {len(out)} distinct {what} of {n} asked for")
    return out


SEEDS = [
    "This article is well sourced, thanks",
    "Your edit seems wrong on the dates, see the talk page",
    "The infobox looks outdated for now",
    "Honestly, the new draft reads as much better now",
    "You are a moron, this article is too long",
    "What a clown, your edit is unclear",
    "Stop being a loser, the last revert sounds a bit biased lol",
    "This is garbage, the lead section is confusing",
]


def write_quickstart_files(
    out_dir: str | Path,
    n_logs: int = 360,
    n_test: int = 200,
    seed: int = 0,
    error_rate: float = 0.1,
) -> dict[str, Path]:
    """Write the quickstart inputs: logs (half already answered by the teacher, in OpenAI
    record format; a few duplicates and malformed lines, as real logs have), seeds, test set."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test = generate_comments(n_test, seed + 1, exclude=set(SEEDS))
    logs = generate_comments(n_logs, seed, toxic_share=0.3, exclude=set(SEEDS) | set(test))
    rng = random.Random(seed + 2)
    lines: list[str] = []
    for i, text in enumerate(logs):
        if i % 2 == 0:
            label = teacher_label(text, error_rate, seed)
            answer = format_answer(label, text)
            rec = {
                "request": {
                    "model": "sim-teacher",
                    "messages": [{"role": "user", "content": PROMPT.replace("{input}", text)}],
                },
                "response": {
                    "model": "sim-teacher",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": answer},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": len(PROMPT.split()) + len(text.split()),
                        "completion_tokens": 8,
                    },
                },
            }
        else:
            rec = {"input": text, "user": f"user{rng.randrange(50)}"}
        lines.append(json.dumps(rec))
    # Real logs repeat themselves and break: a few re-sent inputs and two damaged lines.
    for text in logs[1:20:4]:
        lines.append(json.dumps({"input": "  " + text.upper() + " "}))
    lines.insert(17, '{"input": "this line was cut off by a crashed writer')
    lines.insert(101, "not json at all")
    paths = {"logs": out / "logs.jsonl", "seeds": out / "seeds.jsonl", "test": out / "test.jsonl"}
    paths["logs"].write_text("\n".join(lines) + "\n")
    paths["seeds"].write_text("".join(json.dumps({"input": s}) + "\n" for s in SEEDS))
    paths["test"].write_text(
        "".join(json.dumps({"input": t, "label": true_label(t)}) + "\n" for t in test)
    )
    return paths
