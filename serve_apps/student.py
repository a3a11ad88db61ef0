"""Students behind Ray Serve: one deployment per group of students that share a base model.

LoRA students trained on the same base (the same hub id, or the same saved base weights)
are one group: a replica loads the base once and every student's adapter beside it (the
LoRAX idea), and a request's ``model`` picks the adapter. Any other student (full
fine-tuning, a merged model, a lone adapter, merged at load) is a group of one.

``StudentGroup`` is plain Python (tested without Ray): it checks a request against the
student's context, answers batches (grouped by student and answer length) with
``Student.answer`` (the task's answer plus a confidence; a classifier's every class
probability too), and counts usage with the student's own tokenizer. ``StudentDeployment``
is its Serve wiring: ``@serve.batch`` with the configured size and wait, one batch at a
time. The router calls its
``answer``; deployed alone (``direct_app``) it also answers ``POST /v1/chat/completions``
itself (strict validation, no launch modes, no request log): the benchmark's baseline.
"""

# No `from __future__ import annotations` in this module: Serve rewrites the endpoint
# signatures and FastAPI reads their annotations.

import asyncio
import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from ray_pipeline import storage
from ray_pipeline.config import AUTO_MODEL
from ray_pipeline.train.checkpoint import read_meta
from serve_apps.protocol import (
    ApiError,
    ChatRequest,
    Reply,
    chat_body,
    chat_messages,
    new_id,
    parse_request,
)

# Texts longer than this are tokenized in a thread, off the replica's event loop.
_LONG_TEXT = 20_000


def base_identity(checkpoint: str | Path, meta: dict[str, Any]) -> str | None:
    """What LoRA students must share to be served on one base: the hub base's id, or a
    hash of the saved base weights (the tiny student's). None: not an adapter."""
    if meta["method"] != "lora":
        return None
    base = Path(checkpoint) / "base"
    if not base.is_dir():
        return f"{meta.get('kind', 'causal_lm')}:{meta['base_model']}"
    digest = hashlib.sha256()
    for f in sorted(base.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin"):
            digest.update(f.name.encode())
            digest.update(f.read_bytes())
    return f"{meta.get('kind', 'causal_lm')}:sha256:{digest.hexdigest()}"


def student_groups(students: dict[str, str]) -> list[dict[str, str]]:
    """The students (name -> checkpoint) in groups served by one deployment each."""
    groups: dict[str, dict[str, str]] = {}
    for name, ckpt in students.items():
        local = storage.local_copy(ckpt)  # a URI: copied to this node once
        ident = base_identity(local, read_meta(local))
        key = ident if ident is not None else f"alone:{name}"
        groups.setdefault(key, {})[name] = ckpt
    return list(groups.values())


def load_students(checkpoints: dict[str, str], device: str | None = None) -> dict[str, Any]:
    """name -> Student. Several adapters on one base share one model (``PeftModel`` with
    one named adapter each; ``StudentGroup`` switches to a student's adapter before it
    answers); one checkpoint alone is loaded as ``Student.load`` loads it (merged)."""
    import torch
    from transformers import AutoTokenizer

    from ray_pipeline.train.student import Student

    # Checkpoints on a cloud URI are copied to this replica's node once (``local_copy``).
    checkpoints = {name: storage.local_copy(c) for name, c in checkpoints.items()}
    if len(checkpoints) == 1:
        ((name, ckpt),) = checkpoints.items()
        return {name: Student.load(ckpt, device)}
    from peft import PeftModel

    from ray_pipeline.train.model import load_pretrained

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = list(checkpoints)
    metas = {n: read_meta(checkpoints[n]) for n in names}
    first = Path(checkpoints[names[0]])
    meta0 = metas[names[0]]
    base_source = first / "base" if (first / "base").is_dir() else meta0["base_model"]
    base = load_pretrained(
        str(base_source),
        "auto",
        meta0.get("kind", "causal_lm"),
        meta0.get("labels"),
        meta0.get("pad_id"),
    )
    model = PeftModel.from_pretrained(base, first / "adapter", adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(Path(checkpoints[n]) / "adapter", adapter_name=n)
    model = model.to(device).eval()
    return {
        n: Student(
            model,
            AutoTokenizer.from_pretrained(Path(checkpoints[n]) / "tokenizer"),
            metas[n],
            device,
        )
        for n in names
    }


class ContextTooLong(ValueError):
    """The request does not fit the student (a 400 for the client)."""


class StudentGroup:
    """The students of one deployment, answering requests (see the module docstring)."""

    def __init__(self, students: dict[str, Any]):
        self.students = students
        models = {id(s.model) for s in students.values()}
        self.shared = len(students) > 1 and len(models) == 1  # adapters on one base

    def prompt_tokens(self, name: str, messages: list[dict[str, str]], max_tokens: int) -> int:
        """Tokens of the prompt as the student reads it; ContextTooLong when prompt and answer
        do not fit the student's positions (as OpenAI refuses a context that is too long)."""
        from ray_pipeline.train.data import render_prompt
        from ray_pipeline.train.model import CLASSIFIER

        s = self.students[name]
        if s.kind == CLASSIFIER:
            n = len(s.tokenizer(s.input_text(messages))["input_ids"])
            need, limit = n, s.max_positions
            what = f"the input is {n} tokens"
        else:
            n = len(
                s.tokenizer(render_prompt(s.tokenizer, messages), add_special_tokens=False)[
                    "input_ids"
                ]
            )
            need, limit = n + max_tokens, s.max_positions
            what = f"the messages are {n} tokens and max_tokens asks for {max_tokens} more"
        if limit is not None and need > limit:
            raise ContextTooLong(
                f"This model's maximum context length is {limit} tokens. However, {what} "
                f"({need} in all). Please shorten the messages"
                + ("." if s.kind == CLASSIFIER else " or lower max_tokens.")
            )
        return n

    def answer(self, items: list[tuple[str, list[dict[str, str]], int]]) -> list[Reply]:
        """Answers of (student name, messages, max_tokens) items, in order: one
        ``Student.answer`` call per student and answer length."""
        from ray_pipeline.train.model import CLASSIFIER

        out: list[Reply | None] = [None] * len(items)
        groups: dict[tuple[str, int], list[int]] = {}
        for i, (name, _, max_tokens) in enumerate(items):
            groups.setdefault((name, max_tokens), []).append(i)
        for (name, max_tokens), idx in groups.items():
            s = self.students[name]
            if self.shared:
                s.model.set_adapter(name)
            answers = s.answer(
                [items[i][1] for i in idx], max_new_tokens=max_tokens, batch_size=len(idx)
            )
            for i, a in zip(idx, answers, strict=True):
                completion = len(s.tokenizer(a.text, add_special_tokens=False)["input_ids"])
                # Greedy generation stops at end-of-sequence or at max_tokens; an answer of
                # max_tokens tokens was cut there.
                cut = s.kind != CLASSIFIER and completion >= max_tokens
                out[i] = Reply(
                    text=a.text,
                    prompt_tokens=0,  # set by the caller, which counted them first
                    completion_tokens=completion,
                    finish_reason="length" if cut else "stop",
                    confidence=a.confidence,
                    probs=a.probs,
                )
        return out


class StudentServer:
    """One group of students on each replica; ``answer`` is what the router calls."""

    def __init__(
        self,
        checkpoints: dict[str, str],
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_new_tokens: int = 64,
    ):
        self.group = StudentGroup(load_students(checkpoints))
        self.max_new_tokens = max_new_tokens
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batch(self, items: list[tuple[str, list[dict[str, str]], int]]) -> list[Reply]:
        # On the replica's event loop, not in a thread: while a batch runs, requests queue up
        # and the next batch is full. (Generation in a thread holds the GIL for most of each
        # step and starves the loop's intake: batches of 1-4 instead of 16, measured by
        # benchmarks/serve_load.py at a third of the throughput.)
        return self.group.answer(items)

    async def answer(
        self, name: str, messages: list[dict[str, str]], max_tokens: int
    ) -> dict[str, Any]:
        """A reply (``protocol.Reply`` fields) or ``{"error": {"status", "message", "code"}}``
        for a request the student cannot take."""
        size = sum(len(m["content"]) for m in messages)
        try:
            if size > _LONG_TEXT:
                n = await asyncio.to_thread(self.group.prompt_tokens, name, messages, max_tokens)
            else:
                n = self.group.prompt_tokens(name, messages, max_tokens)
        except ContextTooLong as e:
            return {"error": {"status": 400, "message": str(e), "code": "context_length_exceeded"}}
        reply = await self._batch((name, messages, max_tokens))
        reply.prompt_tokens = n
        return asdict(reply)


# Serve allows one FastAPI ingress per application: the router's. So the deployment the
# router calls is the plain server; the one answering HTTP alone wraps it.
StudentDeployment = serve.deployment(max_ongoing_requests=32)(StudentServer)

student_api = FastAPI(title="distill student", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(max_ongoing_requests=32)
@serve.ingress(student_api)
class DirectStudent:
    """A group of students answering HTTP themselves (``direct_app``)."""

    def __init__(self, *args: Any):
        self.server = StudentServer(*args)
        self.students = self.server.group.students
        self.max_new_tokens = self.server.max_new_tokens

    @student_api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> JSONResponse:
        """The student alone (``direct_app``): validated like the router validates."""
        rid = new_id("chatcmpl")
        try:
            req = parse_request(await request.body(), ChatRequest)
            name = next(iter(self.students)) if req.model == AUTO_MODEL else req.model
            if name not in self.students:
                raise ApiError(
                    404,
                    f"The model `{req.model}` does not exist.",
                    param="model",
                    code="model_not_found",
                )
            limit = req.token_limit() or self.max_new_tokens
            if limit > self.max_new_tokens:
                raise ApiError(
                    400,
                    f"max_tokens is too large: {limit}.",
                    param="max_tokens",
                    code="invalid_value",
                )
        except ApiError as e:
            return JSONResponse(status_code=e.status, content=e.body())
        result = await self.server.answer(name, chat_messages(req), limit)
        if "error" in result:
            err = result["error"]
            return JSONResponse(status_code=err["status"], content=error_of(err))
        return JSONResponse(chat_body(rid, name, Reply(**result).cut_at(req.stop)))


def error_of(err: dict[str, Any]) -> dict[str, Any]:
    return ApiError(err["status"], err["message"], code=err["code"]).body()


def direct_app(args: dict[str, Any]) -> serve.Application:
    """The students of the run alone, without the router (``AppArgs`` like the router's;
    its first group of students): the baseline the router's overhead is measured against."""
    from ray_pipeline.serving.args import AppArgs

    a = AppArgs.model_validate(args)
    s = a.serve
    group = student_groups(a.students)[0]
    return DirectStudent.options(
        ray_actor_options={"num_cpus": s.student.num_cpus, "num_gpus": s.student.num_gpus},
        max_ongoing_requests=s.student.max_ongoing_requests,
        graceful_shutdown_timeout_s=s.shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=min(0.25, s.shutdown_timeout_s),
    ).bind(group, s.batching.max_batch_size, s.batching.wait_timeout_s, s.max_new_tokens)
