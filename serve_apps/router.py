"""OpenAI-compatible ingress that splits traffic between the student and the teacher.

Deploy by import path, like any Serve app:

    serve run serve_apps.router:app checkpoint=runs/<id>/train/checkpoint \
        teacher_base_url=https://api.openai.com/v1 teacher_model=gpt-4o-mini \
        teacher_api_key_env=OPENAI_API_KEY weights='{"student": 0.9, "teacher": 0.1}'

``POST /v1/chat/completions`` answers from one target, chosen per request by the configured
weights (a request whose ``model`` names a target goes to that target); the answer's ``model``
field and the ``x-distill-target`` header say which one answered. ``GET /v1/models`` lists
the targets. Every request is appended to the request log (the generate stage's input format).
"""

# No `from __future__ import annotations` in this module: Serve rewrites the endpoint
# signatures and FastAPI would then read the body model as a query parameter.

import asyncio
import json
import random
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_apps.completions import RequestLog, error_body
from serve_apps.student import StudentModel
from serve_apps.teacher_proxy import TeacherProxy

TARGET_HEADER = "x-distill-target"
TARGETS = ("student", "teacher")


class RouterArgs(BaseModel):
    """Arguments of the app builder (``serve run serve_apps.router:app key=value ...``)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(description="Student checkpoint directory.")
    teacher_base_url: str = Field(description="OpenAI-compatible teacher endpoint.")
    teacher_model: str = Field(description="Teacher model name.")
    teacher_api_key_env: str | None = Field(None, description="Env var with the teacher's key.")
    weights: dict[str, float] = Field(default_factory=lambda: {"student": 0.9, "teacher": 0.1})
    request_log: str | None = Field(None, description="JSONL file every request is appended to.")
    num_cpus: float = Field(0.25, gt=0, description="CPUs per replica.")
    student_num_gpus: float = Field(0.0, ge=0, description="GPUs per student replica.")
    max_new_tokens: int = Field(64, gt=0)
    seed: int | None = Field(None, description="Seed of the traffic split (None: random).")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout of a target.")

    @field_validator("weights", mode="before")
    @classmethod
    def _parse_weights(cls, v: Any) -> Any:
        return json.loads(v) if isinstance(v, str) else v

    @field_validator("weights")
    @classmethod
    def _known_targets(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - set(TARGETS)
        if unknown or any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError(
                f"weights must map {TARGETS} to weights >= 0 with a positive sum, got {v}"
            )
        return v


def pick_target(weights: dict[str, float], requested: str | None, rng: random.Random) -> str:
    """The target for one request: the one named in ``model`` if it is a target, else a
    weighted random choice."""
    if requested in weights:
        return requested
    names = [n for n, w in weights.items() if w > 0]
    return rng.choices(names, weights=[weights[n] for n in names], k=1)[0]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # temperature, max_tokens, ... pass through
    model: str = "auto"
    messages: list[dict[str, Any]] = Field(min_length=1)


api = FastAPI(title="distill router")


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    # OpenAI clients expect 400 with an error object (FastAPI's default is 422 + detail).
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JSONResponse(
        status_code=400,
        content=error_body(f"invalid request: {problems}", "invalid_request_error", 400),
    )


async def _wait(response: Any) -> Any:
    return await response  # a DeploymentResponse is awaitable but not a coroutine


# The router only awaits its targets: many requests per replica.
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress(api)
class Router:
    def __init__(
        self,
        targets: dict[str, DeploymentHandle],
        weights: dict[str, float],
        request_log: str | None = None,
        seed: int | None = None,
        timeout_s: float = 60.0,
    ):
        self.targets = targets
        self.weights = weights
        self.rng = random.Random(seed)
        self.timeout_s = timeout_s
        self.log = RequestLog(request_log) if request_log else None

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "distill"}
                for n in ["auto", *self.targets]
            ],
        }

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatRequest) -> JSONResponse:
        body = req.model_dump()
        if body.get("stream"):
            return JSONResponse(
                status_code=400,
                content=error_body("stream=true is not supported", "invalid_request_error", 400),
            )
        target = pick_target(self.weights, req.model, self.rng)
        started = time.perf_counter()
        response = self.targets[target].chat.remote(body)
        status, payload = 200, None
        try:
            payload = await asyncio.wait_for(_wait(response), self.timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            status, error = (
                504,
                error_body(
                    f"target '{target}' timed out after {self.timeout_s}s",
                    "upstream_timeout",
                    504,
                    target=target,
                ),
            )
        except Exception as e:  # noqa: BLE001 - any failure of a target becomes a 502 for the caller
            cause = getattr(e, "cause", None) or e  # RayTaskError wraps the target's exception
            status, error = (
                502,
                error_body(
                    f"target '{target}' failed: {type(cause).__name__}: {cause}",
                    "upstream_error",
                    502,
                    target=target,
                ),
            )
        latency_ms = round((time.perf_counter() - started) * 1000, 2)
        if self.log is not None:
            self.log.write(
                {
                    "request": {k: v for k, v in body.items() if v is not None},
                    "response": payload,
                    "served_by": target,
                    "status": status,
                    "error": None if status == 200 else error["error"]["message"],
                    "latency_ms": latency_ms,
                    "ts": time.time(),
                }
            )
        headers = {TARGET_HEADER: target}
        if status != 200:
            headers["x-should-retry"] = "false"  # the router already gave the target its chance
            return JSONResponse(status_code=status, content=error, headers=headers)
        payload["model"] = target
        return JSONResponse(content=payload, headers=headers)


def app(args: dict[str, Any]) -> serve.Application:
    """Application builder: student + teacher targets behind the router."""
    a = RouterArgs.model_validate(args)
    opts = {"ray_actor_options": {"num_cpus": a.num_cpus}}
    targets = {}
    if a.weights.get("student", 0) > 0:
        targets["student"] = StudentModel.options(
            name="student",
            ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.student_num_gpus},
        ).bind(a.checkpoint, "student", a.max_new_tokens)
    if a.weights.get("teacher", 0) > 0:
        targets["teacher"] = TeacherProxy.options(name="teacher", **opts).bind(
            a.teacher_base_url, a.teacher_model, a.teacher_api_key_env, a.timeout_s
        )
    weights = {n: w for n, w in a.weights.items() if n in targets}
    return Router.options(**opts).bind(targets, weights, a.request_log, a.seed, a.timeout_s)
