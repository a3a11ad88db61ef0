"""Seed expansion: a few hand-written example inputs -> new inputs written by the teacher.

Each expansion request shows a different random subset of the seeds (and rotating topics and
personas); the answers are parsed into lists, deduplicated against the seeds and each other,
and become ordinary input rows for the teacher to answer.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

from ray_pipeline.config import SeedsSection, TaskSection
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.data.schema import OK, dumps, new_row, row_id, to_table
from ray_pipeline.data.sources import read_texts
from ray_pipeline.run_state import Run
from ray_pipeline.teacher.parse import parse_list
from ray_pipeline.teacher.quota import from_pico, to_pico
from ray_pipeline.teacher.session import TeacherSession

log = logging.getLogger("distill.generate")


def expansion_rows(
    seeds: list[str], sc: SeedsSection, task: TaskSection, seed: int
) -> list[dict[str, Any]]:
    """The requests that expand the seeds into ``sc.n_new`` new inputs: each shows a
    different random subset of the seeds, in a different order (diversity)."""
    if not seeds:
        raise ValueError(f"{sc.path}: no seed examples")
    rows = []
    for i in range(math.ceil(sc.n_new / sc.per_request)):
        rng = random.Random(f"{seed}:{i}")
        examples = rng.sample(seeds, min(sc.examples_per_request, len(seeds)))
        n = min(sc.per_request, sc.n_new - i * sc.per_request)
        # Topics and personas rotate (not sampled): every one is used evenly.
        slots = {
            "task": task.name,
            "examples": "\n".join(f"- {e}" for e in examples),
            "n": n,
            "topic": sc.topics[i % len(sc.topics)] if sc.topics else "",
            "persona": sc.personas[i % len(sc.personas)] if sc.personas else "",
        }
        prompt = sc.template.format(**slots)
        rows.append(
            new_row(
                id=row_id(f"seeds:{sc.path}", f"expansion:{seed}:{i}"),
                source=f"seeds:{sc.path}",
                source_line=i,
                messages=dumps([{"role": "user", "content": prompt}]),
            )
        )
    return rows


def synthetic_input_rows(
    answered: list[dict[str, Any]], seeds: list[str], sc: SeedsSection, prompt: Prompt
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """New input rows from answered expansion requests, deduplicated (case and whitespace
    insensitive) against the seeds and each other, at most ``sc.n_new``; plus counts."""
    seen = {" ".join(s.lower().split()) for s in seeds}
    out: list[dict[str, Any]] = []
    counts = {
        "requests": len(answered),
        "failed_requests": 0,
        "generated": 0,
        "duplicates": 0,
        "kept": 0,
    }
    source = f"seeds:{sc.path}"
    for row in answered:
        if row["status"] != OK:
            counts["failed_requests"] += 1
            continue
        for text in parse_list(row["response"]):
            counts["generated"] += 1
            key = " ".join(text.lower().split())
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            if len(out) < sc.n_new:
                out.append(
                    new_row(
                        id=row_id(source, text),
                        source=source,
                        source_line=len(out),
                        input=text,
                        messages=dumps(prompt.messages(text)),
                        prompt_hash=prompt.hash,
                    )
                )
    counts["kept"] = len(out)
    return out, counts


def expand_seeds(run: Run, session: TeacherSession) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """New input rows from the seed examples, and the counts of the expansion."""
    sc = run.cfg.data.seeds
    seeds = [r[sc.input_field] for r in read_texts(sc.path, sc.input_field)]
    requests = expansion_rows(seeds, sc, run.cfg.task, run.cfg.run.seed)
    if not requests:
        return [], {"requests": 0}
    answered = session.pool(
        session.dataset(to_table(requests)),
        params={"temperature": sc.temperature, "max_tokens": sc.max_tokens, "n": 1},
        voters=False,
    ).take_all()
    rows, counts = synthetic_input_rows(answered, seeds, sc, Prompt.from_task(run.cfg.task))
    counts["seeds"] = len(seeds)
    # The expansion requests are no rows of the output: their spend is counted here.
    counts["prompt_tokens"] = sum(r["prompt_tokens"] or 0 for r in answered)
    counts["completion_tokens"] = sum(r["completion_tokens"] or 0 for r in answered)
    counts["cost_usd"] = from_pico(sum(to_pico(r["cost"] or 0.0) for r in answered))
    log.info("seed expansion: %s", counts)
    return rows, counts
