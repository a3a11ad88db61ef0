"""The teacher simulator: a real OpenAI-compatible HTTP server for offline runs and tests.

It answers ``POST /v1/chat/completions`` and ``GET /v1/models``:

* from **replay tables** of recorded responses keyed by input text (e.g. every Jigsaw
  ``*.responses.csv``, answering with its ``simple_prompt`` column), the input being recovered
  from the prompt by the task's template;
* for the built-in **quickstart** task by its rule, wrong on a configurable share of answers;
* for **seed expansion** prompts (the run's expansion template) with new quickstart-style inputs.

Answers carry token ``usage`` (about 4 characters per token) and a configurable latency.
``GET /metrics`` counts what was served. Start it with ``distill teacher-sim``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from ray_pipeline.data import synthetic
from ray_pipeline.data.sources import read_records
from ray_pipeline.teacher.prompts import Prompt, last_user_content


def count_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def load_replay(path: str | Path, input_field: str, response_field: str) -> dict[str, str]:
    """{input text: recorded response} from a CSV/JSONL/Parquet file."""
    table: dict[str, str] = {}
    for i, rec in enumerate(read_records(path), 1):
        if input_field not in rec or response_field not in rec:
            raise ValueError(f"{path}: record {i} lacks {input_field!r} or {response_field!r}")
        if rec[response_field] not in (None, ""):
            table[str(rec[input_field])] = str(rec[response_field])
    return table


def _template_regex(template: str) -> re.Pattern:
    """A regex for a str.format-style template whose {names} become named groups."""
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        out.append(re.escape(part) if i % 2 == 0 else f"(?P<{part}>.*?)")
    return re.compile("^" + "".join(out) + "$", re.S)


@dataclass
class SimulatorSpec:
    model: str = "sim-teacher"
    replay: dict[str, str] = field(default_factory=dict)
    rule: str | None = None  # "quickstart"
    error_rate: float = 0.1
    latency_ms: float = 0.0
    seed: int = 0
    prompts: list[Prompt] = field(default_factory=list)  # to recover inputs from prompts
    expansion_template: str | None = None
    label_key: str = "toxic"


class Simulator:
    """The simulator's answers, as a plain class (the HTTP layer is `make_app`)."""

    def __init__(self, spec: SimulatorSpec):
        self.spec = spec
        self.counts: Counter[str] = Counter()
        self._expansion = _template_regex(spec.expansion_template) if spec.expansion_template else None

    def _input_of(self, prompt_text: str) -> str:
        for p in self.spec.prompts:
            extracted = p.extract(prompt_text)
            if extracted is not None:
                return extracted
        return prompt_text

    def answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for a chat-completion request body."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, _error("'messages' must be a non-empty list", "invalid_request_error")
        user = last_user_content(messages)
        if user is None:
            return 400, _error("no user message with text content", "invalid_request_error")
        n = body.get("n") or 1
        if not isinstance(n, int) or not 1 <= n <= 16:
            return 400, _error(f"'n' must be an integer in [1, 16], got {n!r}", "invalid_request_error")
        texts = self._texts(user, n, body)
        if texts is None:
            self.counts["not_found"] += 1
            return 404, _error(
                "the simulator has no recorded response for this input and no rule for it",
                "not_found_error",
            )
        self.counts["ok"] += 1
        prompt_tokens = sum(count_tokens(str(m.get("content", ""))) for m in messages)
        completion_tokens = sum(count_tokens(t) for t in texts)
        self.counts["prompt_tokens"] += prompt_tokens
        self.counts["completion_tokens"] += completion_tokens
        return 200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.spec.model,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop", "logprobs": None}
                for i, t in enumerate(texts)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _texts(self, user: str, n: int, body: dict[str, Any]) -> list[str] | None:
        if self._expansion is not None:
            m = self._expansion.match(user)
            if m is not None:
                self.counts["expansion"] += 1
                return [self._expand(user, m, i, body) for i in range(n)]
        text = self._input_of(user)
        if text in self.spec.replay:
            self.counts["replay"] += 1
            return [self.spec.replay[text]] * n
        if self.spec.rule == "quickstart":
            self.counts["rule"] += 1
            return [
                synthetic.format_answer(
                    synthetic.teacher_label(text, self.spec.error_rate, self.spec.seed, sample=i),
                    text,
                    self.spec.label_key,
                )
                for i in range(n)
            ]
        return None

    def _expand(self, user: str, m: re.Match, sample: int, body: dict[str, Any]) -> str:
        groups = m.groupdict()
        try:
            k = int(groups.get("n") or 5)
        except ValueError:
            k = 5
        seed = int(synthetic.stable_fraction(user, body.get("seed"), sample, self.spec.seed) * 2**31)
        return json.dumps(synthetic.generate_comments(min(k, 100), seed))


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def make_app(sim: Simulator) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        sim.counts["requests"] += 1
        try:
            body = await request.json()
        except json.JSONDecodeError as e:
            sim.counts["bad_request"] += 1
            return web.json_response(_error(f"body is not JSON: {e}", "invalid_request_error"), status=400)
        if not isinstance(body, dict):
            return web.json_response(_error("body must be a JSON object", "invalid_request_error"), status=400)
        if sim.spec.latency_ms:
            await asyncio.sleep(sim.spec.latency_ms / 1000)
        status, payload = sim.answer(body)
        return web.json_response(payload, status=status)

    async def models(_: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": sim.spec.model, "object": "model", "created": 0, "owned_by": "distill-simulator"}]}
        )

    async def metrics(_: web.Request) -> web.Response:
        return web.json_response(dict(sim.counts))

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    return app


def serve_forever(sim: Simulator, host: str, port: int, ready_file: str | None = None) -> None:
    """Run the server until killed; print (and optionally write) its base URL when listening."""

    async def main() -> None:
        runner = web.AppRunner(make_app(sim), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        bound = runner.addresses[0][1]
        url = f"http://{host}:{bound}/v1"
        print(f"teacher simulator listening on {url}", flush=True)
        if ready_file:
            tmp = Path(ready_file + ".tmp")
            tmp.write_text(url)
            tmp.rename(ready_file)
        await asyncio.Event().wait()

    asyncio.run(main())


def spec_from_config(cfg) -> SimulatorSpec:
    """The simulator a run config asks for (replay tables are read here)."""
    sim = cfg.teacher.simulator
    replay: dict[str, str] = {}
    for src in sim.replay:
        replay.update(load_replay(src.path, src.input_field, src.response_field))
    return SimulatorSpec(
        model=cfg.teacher.model,
        replay=replay,
        rule=sim.rule,
        error_rate=sim.error_rate,
        latency_ms=sim.latency_ms,
        seed=sim.seed,
        prompts=[Prompt.from_task(cfg.task)],
        expansion_template=cfg.data.seeds.template if cfg.data.seeds else None,
        label_key=cfg.task.label_key,
    )


@contextlib.contextmanager
def running_simulator(config_file: str | Path, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0):
    """Start `distill teacher-sim --from-config FILE` as a child process; yield its base URL;
    stop it on exit."""
    with tempfile.TemporaryDirectory(prefix="distill-sim-") as tmp:
        ready = Path(tmp) / "url"
        log = open(Path(tmp) / "sim.log", "w+")  # noqa: SIM115 - closed below
        cmd = [sys.executable, "-m", "ray_pipeline.cli", "teacher-sim", "--from-config", str(config_file), "--host", host, "--port", str(port), "--ready-file", str(ready)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"teacher simulator did not start (exit code {proc.poll()}):\n{log.read()[-3000:]}")
                time.sleep(0.05)
            yield ready.read_text()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
