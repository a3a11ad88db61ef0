"""Launch-mode decisions, as plain functions over plain values (no Ray, no HTTP):
the canary split (sticky per user), answer validity and agreement, and when hybrid serving
falls back to the teacher. (The live settings they read: ``ray_pipeline.serving.live``.)"""

from __future__ import annotations

import hashlib
import random

from ray_pipeline.config import TaskSection
from ray_pipeline.teacher.parse import parse_answer, parse_generative
from serve_apps.protocol import Reply


def sticky_point(key: str) -> float:
    """A user's fixed point in [0, 1): the same user lands in the same share of traffic."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def pick(weights: dict[str, float], key: str | None, rng: random.Random) -> str:
    """A target by weight. With a sticky `key` the draw is the key's fixed point, so a user
    keeps their target while the weights stay, and while weights change a user only moves
    when the share they are in shrinks past them (targets are laid out in the weights'
    order: list a canary first and 1% -> 10% -> 50% only adds users to it)."""
    names = [n for n, w in weights.items() if w > 0]
    total = sum(weights[n] for n in names)
    u = (sticky_point(key) if key is not None else rng.random()) * total
    for name in names:
        u -= weights[name]
        if u < 0:
            return name
    return names[-1]  # u == total after rounding


class Answers:
    """The task's answer format: whether an answer is in it, and whether two answers agree."""

    def __init__(self, task: TaskSection):
        self.task = task

    def label(self, text: str) -> str | None:
        t = self.task
        if t.generative:
            return None  # a generative answer has no label
        return parse_answer(text, t.label_key, t.labels, t.label_aliases).label

    def valid(self, text: str) -> bool:
        if self.task.generative:  # non-empty, and a JSON value when the task has a schema
            return parse_generative(text, self.task.output_schema).output is not None
        return self.label(text) is not None

    def agree(self, a: str, b: str) -> bool:
        """Same label when both are in the task's format, else the same text (a generative
        task: the same text)."""
        la, lb = self.label(a), self.label(b)
        if la is not None and lb is not None:
            return la == lb
        return a.strip() == b.strip()


def fallback_reason(
    reply: Reply | None, error: str | None, valid: bool, min_confidence: float
) -> str | None:
    """Why hybrid serving lets the teacher answer instead of the student (None: it does not).
    `error`: the student's failure ('timeout' or 'error')."""
    if error is not None:
        return error
    if not valid:
        return "invalid_format"
    if reply.confidence is not None and reply.confidence < min_confidence:
        return "low_confidence"
    return None
