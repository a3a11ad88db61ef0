"""Row components of the generate stage: teacher calls, answer parsing, seed expansion.

Plain Python over lists of row dicts (unit-tested without Ray); ``stage.py`` wires them into
Ray Data.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from typing import Any

import pyarrow as pa

from ray_pipeline.config import SeedsSection, TaskSection, TeacherSection
from ray_pipeline.data.schema import FAILED, OK, dumps, new_row, row_id, to_table
from ray_pipeline.teacher.client import TeacherCallError, TeacherClient
from ray_pipeline.teacher.parse import parse_answer, parse_list
from ray_pipeline.teacher.prompts import Prompt


def needs_teacher(row: dict[str, Any]) -> bool:
    return row["status"] == OK and row["response"] is None


class TeacherCaller:
    """Fills ``response`` (and usage, latency, attempts) of every row that still needs an
    answer; a request that fails for good marks its row ``failed`` with the error.

    Used as a Ray Data actor (one event loop per actor, ``per_actor_concurrency`` requests in
    flight) and directly in tests.
    """

    def __init__(self, base_url: str, api_key: str, teacher: dict[str, Any], params: dict[str, Any] | None = None):
        self.cfg = TeacherSection.model_validate(teacher)
        self.base_url = base_url
        self.api_key = api_key
        self.params = {"temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens, **(params or {})}
        self._client: TeacherClient | None = None
        self._sem: asyncio.Semaphore | None = None

    def _ensure_client(self) -> TeacherClient:
        # Created lazily: the client and semaphore belong to the loop that runs the calls.
        if self._client is None:
            self._client = TeacherClient(
                self.base_url,
                self.cfg.model,
                self.api_key,
                timeout_s=self.cfg.timeout_s,
                max_attempts=self.cfg.max_attempts,
                max_connections=self.cfg.per_actor_concurrency,
            )
            self._sem = asyncio.Semaphore(self.cfg.per_actor_concurrency)
            self._loop = asyncio.get_running_loop()
        return self._client

    def __del__(self) -> None:
        # Ray Data deletes the UDF when its actor shuts down: close the HTTP session on the
        # loop it belongs to (it is still running then), so no connection is left dangling.
        loop = getattr(self, "_loop", None)
        if self._client is not None and loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(self._client.aclose(), loop).result(timeout=10)

    async def call_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        client = self._ensure_client()
        await asyncio.gather(*(self._fill(client, r) for r in rows if needs_teacher(r)))
        return rows

    async def _fill(self, client: TeacherClient, row: dict[str, Any]) -> None:
        params = dict(self.params)
        if params.get("temperature", 0) > 0:
            # A stable per-row seed: sampled answers differ across rows, repeat across runs.
            params.setdefault("seed", int(row["id"][:8], 16))
        async with self._sem:
            try:
                reply = await client.complete(json.loads(row["messages"]), **params)
            except TeacherCallError as e:
                row.update(
                    status=FAILED,
                    reason=f"teacher_error: {e}",
                    error_class=e.error_class,
                    status_code=e.status_code,
                    attempts=e.attempts,
                    teacher=self.cfg.model,
                )
                return
        row.update(
            response=reply.texts[0],
            teacher=reply.model,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            latency_s=reply.latency_s,
            attempts=reply.attempts,
        )

    async def __call__(self, batch: pa.Table) -> pa.Table:
        return to_table(await self.call_rows(batch.to_pylist()))


def parse_rows(rows: list[dict[str, Any]], task: TaskSection) -> list[dict[str, Any]]:
    """Parse each answered row's response into ``output`` and ``label``. An answer with no
    structured value in it fails the row; a parsed answer without a valid label keeps
    ``label`` empty for curation to filter with its reason."""
    for row in rows:
        if row["status"] != OK or row["response"] is None or row["output"] is not None:
            continue
        parsed = parse_answer(row["response"], task.label_key, task.labels, task.label_aliases)
        if parsed.output is None:
            row.update(status=FAILED, reason=parsed.error)
            continue
        row.update(output=dumps(parsed.output), label=parsed.label)
    return rows


def expansion_rows(seeds: list[str], sc: SeedsSection, task: TaskSection, seed: int) -> list[dict[str, Any]]:
    """The requests that expand the seeds into ``sc.n_new`` new inputs: each shows a
    different random subset of the seeds, in a different order (diversity)."""
    if not seeds:
        raise ValueError(f"{sc.path}: no seed examples")
    rows = []
    for i in range(math.ceil(sc.n_new / sc.per_request)):
        rng = random.Random(f"{seed}:{i}")
        examples = rng.sample(seeds, min(sc.examples_per_request, len(seeds)))
        n = min(sc.per_request, sc.n_new - i * sc.per_request)
        prompt = sc.template.format(task=task.name, examples="\n".join(f"- {e}" for e in examples), n=n)
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
    counts = {"requests": len(answered), "failed_requests": 0, "generated": 0, "duplicates": 0, "kept": 0}
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
