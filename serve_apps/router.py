"""The OpenAI-compatible ingress: students and the teacher behind one endpoint, in one of
three launch modes (``serve.mode``).

Deploy by import path, like any Serve app (``distill serve build CONFIG`` writes the config
file with its arguments; ``distill serve run CONFIG`` deploys it locally)::

    serve deploy serve.yaml          # applications: - import_path: serve_apps.router:app

Endpoints: ``POST /v1/chat/completions`` (also ``stream: true``), ``POST /v1/completions``,
``GET /v1/models``; ``GET|PUT /admin/live`` (live weights, hybrid threshold, shadow rate) and
``GET /admin/stats``; ``GET /health``. A request's ``model`` is ``auto`` (the launch mode
chooses) or a target (a student's name, or ``teacher``): that target alone answers.

* canary: a weighted split over targets; sticky per user (``serve.sticky_header``, else the
  body's ``user``).
* shadow: the primary answers; a copy of the request goes to the shadow target in the
  background and both answers are logged with their agreement.
* hybrid: the student answers first; the teacher answers instead when the student's
  confidence is under ``min_confidence``, its answer is not in the task's format, or it fails
  or times out.

Every response says who answered (``x-distill-target``; hybrid: ``x-distill-fallback`` with
the reason), as does the request log. Bad requests get a 4xx with an OpenAI error object
(``protocol``); a 5xx means a target failed (502), timed out (504) or a bug.

Students are deployments of their own, called over Serve's inter-deployment gRPC, or, with
``serve.student_placement: router``, loaded in each router replica and called in-process (no
hop between replicas; they scale with the router).

Live settings live in one ``RouterControl`` replica: the admin endpoint updates it, as does
a Serve config update of its ``user_config``; every router replica polls it twice a second.
Logging, metrics and drift statistics are computed off the request path, in a background
thread of each router replica (``request_log.Background``).
"""

# No `from __future__ import annotations` in this module: Serve rewrites the endpoint
# signatures and FastAPI reads their annotations.

import asyncio
import hmac
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_pipeline import storage
from ray_pipeline.config import AUTO_MODEL, TEACHER_TARGET, ReplicaSection, ServeSection
from ray_pipeline.data.prompts import Prompt, last_user_content
from ray_pipeline.serving.args import AppArgs
from ray_pipeline.serving.live import apply_live, live_settings
from ray_pipeline.serving.request_log import RequestLogFiles
from serve_apps.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Reply,
    chat_body,
    chat_messages,
    chat_stream,
    completion_body,
    completion_stream,
    error_body,
    new_id,
    parse_request,
)
from serve_apps.request_log import Background
from serve_apps.routing import Answers, fallback_reason, pick
from serve_apps.student import StudentDeployment, StudentServer, student_groups
from serve_apps.teacher_proxy import TeacherProxy, TeacherQuota

log = logging.getLogger("distill.serve")

TARGET_HEADER = "x-distill-target"
FALLBACK_HEADER = "x-distill-fallback"
POLL_S = 0.5  # how often a router replica reads the live settings
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]


# ----------------------------------------------------------------------------- live settings
@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class RouterControl:
    """The live settings every router replica follows: weights, hybrid threshold, shadow
    sample rate. Changed by ``PUT /admin/live`` (through any router replica) or by a Serve
    config update of this deployment's ``user_config``; each change gets a new version."""

    def __init__(self, serve_section: dict[str, Any]):
        import uuid

        self.serve = ServeSection.model_validate(serve_section)
        # (epoch, version): a restarted control starts a new epoch at version 1.
        self.epoch = uuid.uuid4().hex
        self.version = 1

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        # A bad user_config fails the config update (Serve reports it), the settings stay.
        self.serve = apply_live(self.serve, user_config)
        self.version += 1

    async def get(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "version": self.version, "live": live_settings(self.serve)}

    async def update(self, changes: dict[str, Any]) -> dict[str, Any]:
        try:
            self.serve = apply_live(self.serve, changes)
        except ValueError as e:
            return {"error": str(e)}
        self.version += 1
        return await self.get()


# ------------------------------------------------------------------------------------ metrics
class RouterMetrics:
    """Prometheus metrics (Ray Serve's metrics API; Serve adds deployment, replica and
    application tags), fed from the request log's background thread, plus the same counts
    kept locally for ``GET /admin/stats``."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "distill_requests",
            "Requests answered, by target and HTTP status.",
            ("target", "status"),
        )
        self.latency = Histogram(
            "distill_request_latency_ms",
            "Request latency in the router, by target.",
            LATENCY_BOUNDARIES_MS,
            ("target",),
        )
        self.errors = Counter(
            "distill_target_errors", "Target failures, by target and kind.", ("target", "kind")
        )
        self.hybrid = Counter("distill_hybrid_requests", "Requests served in hybrid mode.")
        self.fallbacks = Counter(
            "distill_hybrid_fallbacks",
            "Hybrid requests the teacher answered, by reason.",
            ("reason",),
        )
        self.fallback_rate = Gauge(
            "distill_fallback_rate", "Share of hybrid requests that fell back."
        )
        self.shadow_pairs = Counter("distill_shadow_pairs", "Shadow answers compared.")
        self.shadow_disagreements = Counter(
            "distill_shadow_disagreements", "Shadow answers that disagreed with the primary."
        )
        self.disagreement_rate = Gauge(
            "distill_shadow_disagreement_rate", "Share of shadow pairs that disagree."
        )
        self.outputs = Counter(
            "distill_student_outputs",
            "Student answers, by student and validity.",
            ("student", "valid"),
        )
        self.validity_rate = Gauge(
            "distill_output_validity_rate",
            "Share of student answers in the task's format.",
            ("student",),
        )
        self.length_psi = Gauge(
            "distill_input_length_psi", "PSI of served input lengths against the training inputs."
        )
        self.unknown_words = Gauge(
            "distill_input_unknown_word_rate", "Share of served words never seen in training."
        )
        # Every gauge's last value, by (name, tags): ``refresh`` reports them again.
        self._gauges: dict[tuple[str, tuple], tuple[Any, float, dict[str, str] | None]] = {}
        self.counts: dict[str, Any] = {
            "requests": {},
            "errors": {},
            "hybrid": 0,
            "fallbacks": {},
            "shadow_pairs": 0,
            "shadow_disagreements": 0,
            "outputs": {},
        }

    def set_gauge(self, gauge: Any, value: float, tags: dict[str, str] | None = None) -> None:
        """Set a gauge and remember its value for ``refresh``."""
        key = (gauge.info["name"], tuple(sorted((tags or {}).items())))
        self._gauges[key] = (gauge, value, tags)
        gauge.set(value, tags=tags)

    def refresh(self) -> None:
        """Report every gauge's last value again. Ray's metrics agent keeps a gauge only for
        two report intervals after it was last set, so without this a quiet router's rates
        (fallback, disagreement, validity, drift) would vanish from Prometheus seconds after
        its last hybrid or shadow request. Runs in the request log's thread, as ``observe``."""
        for gauge, value, tags in list(self._gauges.values()):
            gauge.set(value, tags=tags)

    def observe(self, records: list[dict[str, Any]]) -> None:
        c = self.counts
        for r in records:
            target = r["served_by"] or "none"
            key = f"{target}:{r['status']}"
            c["requests"][key] = c["requests"].get(key, 0) + 1
            self.requests.inc(tags={"target": target, "status": str(r["status"])})
            self.latency.observe(r["latency_ms"], tags={"target": target})
            for t, kind in r["_target_errors"]:
                c["errors"][f"{t}:{kind}"] = c["errors"].get(f"{t}:{kind}", 0) + 1
                self.errors.inc(tags={"target": t, "kind": kind})
            if r["mode"] == "hybrid":
                c["hybrid"] += 1
                self.hybrid.inc()
                if r["fallback"] is not None:
                    reason = r["fallback"]
                    c["fallbacks"][reason] = c["fallbacks"].get(reason, 0) + 1
                    self.fallbacks.inc(tags={"reason": reason})
                self.set_gauge(self.fallback_rate, sum(c["fallbacks"].values()) / c["hybrid"])
            shadow = r["shadow"]
            if shadow is not None and shadow["agree"] is not None:
                c["shadow_pairs"] += 1
                self.shadow_pairs.inc()
                if not shadow["agree"]:
                    c["shadow_disagreements"] += 1
                    self.shadow_disagreements.inc()
                self.set_gauge(
                    self.disagreement_rate, c["shadow_disagreements"] / c["shadow_pairs"]
                )
            for student, valid in r["_student_outputs"]:
                ok, total = c["outputs"].get(student, (0, 0))
                c["outputs"][student] = (ok + valid, total + 1)
                self.outputs.inc(tags={"student": student, "valid": str(valid).lower()})
                self.set_gauge(
                    self.validity_rate, (ok + valid) / (total + 1), tags={"student": student}
                )


# ------------------------------------------------------------------------------------- router
@dataclass
class Outcome:
    """What one target did with a request."""

    target: str
    reply: Reply | None = None
    error: ApiError | None = None
    latency_ms: float = 0.0
    valid: bool | None = None  # students: the answer is in the task's format


@dataclass
class Served:
    """What the client gets, and what the log keeps beside it."""

    answer: Outcome
    fallback: str | None = None
    student: Outcome | None = None  # hybrid: the student's attempt when the teacher answered
    target_errors: list[tuple[str, str]] = field(default_factory=list)


def _kind_of(error: ApiError) -> str:
    return {504: "timeout", 429: "rate_limited", 400: "refused"}.get(error.status, "error")


api = FastAPI(title="distill router", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown paths and methods answer like OpenAI: an error object, not {"detail": ...}.
    message = {
        404: f"Unknown path {request.url.path}",
        405: f"Method {request.method} not allowed on {request.url.path}",
    }
    return JSONResponse(
        status_code=exc.status_code,
        content=error_body(
            message.get(exc.status_code, str(exc.detail)), code=str(exc.status_code)
        ),
    )


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class Router:
    def __init__(
        self,
        args: dict[str, Any],
        students: dict[str, Any],
        teacher: Any,
        control: Any,
    ):
        a = AppArgs.model_validate(args)
        s = a.serve
        self.serve = s
        # Calls to the targets go over Serve's inter-deployment gRPC (by value) rather than
        # as Ray actor calls: on 2 CPUs a third less router overhead and a seventh more
        # requests/s (benchmarks/serve_load.py). One handle per target's `answer`, made once
        # (`handle.answer` makes a new handle on every call).
        self.students = {
            n: h.options(method_name="answer", _by_reference=False) for n, h in students.items()
        }
        # serve.student_placement 'router': the students are loaded here and called in-process.
        self.in_process: dict[str, StudentServer] = {}
        if s.student_placement == "router":
            for group in student_groups(a.students):
                server = StudentServer(
                    group, s.batching.max_batch_size, s.batching.wait_timeout_s, s.max_new_tokens
                )
                self.in_process.update({name: server for name in group})
        self.teacher = teacher.options(method_name="answer", _by_reference=False)
        self.control = control
        self.targets = [*a.serve.students, TEACHER_TARGET]
        self.live = live_settings(a.serve)
        self.epoch, self.version = None, 0  # of the live settings in force (RouterControl)
        replica = serve.get_replica_context().replica_id.unique_id
        # Seeded per replica: replicas of one router must not all draw the same sequence.
        self.rng = random.Random(f"{a.serve.seed}-{replica}")
        self.answers = Answers(a.task)
        self.prompt = Prompt.from_task(a.task)
        self.api_key = self._key(a.serve.api_key_env, "serve.api_key_env")
        self.admin_key = self._key(a.serve.admin_key_env, "serve.admin_key_env")
        self.metrics = RouterMetrics()
        sinks = [self.metrics.observe]
        rl = a.serve.request_log
        self.files = None
        if rl.enabled:
            self.files = RequestLogFiles(rl.dir, rl.format, rl.partition, replica)
            sinks.append(self._write_log)
        self.drift = None
        if a.drift_reference is not None:
            from ray_pipeline.serving.drift import DriftMonitor

            # A file, or its copy under the run's URI (replicas run on any node).
            self.drift = DriftMonitor(json.loads(storage.read_bytes(a.drift_reference)))
            sinks.append(self._observe_drift)
        self.background = Background(sinks, rl.flush_s, tick=self.metrics.refresh)
        self._tasks: set[asyncio.Task] = set()  # shadow calls and the poller, kept alive
        self._poller: asyncio.Task | None = None

    @staticmethod
    def _key(env: str | None, setting: str) -> str | None:
        if env is None:
            return None
        key = os.environ.get(env)
        if not key:
            raise RuntimeError(
                f"{setting}: the environment variable {env} is not set on this replica"
            )
        return key

    # ------------------------------------------------------------------ background work
    def _write_log(self, records: list[dict[str, Any]]) -> None:
        self.files.write([{k: v for k, v in r.items() if not k.startswith("_")} for r in records])

    def _observe_drift(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            if r["status"] == 200 and r["request"] is not None:
                user = last_user_content(r["request"]["messages"]) or ""
                extracted = self.prompt.extract(user)
                self.drift.observe(extracted if extracted is not None else user)
        snap = self.drift.snapshot()
        if snap["length_psi"] is not None:
            self.metrics.set_gauge(self.metrics.length_psi, snap["length_psi"])
        if snap["unknown_word_rate"] is not None:
            self.metrics.set_gauge(self.metrics.unknown_words, snap["unknown_word_rate"])

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ensure_live(self) -> None:
        """The live settings before the first request (a config file's user_config may differ
        from the arguments' values), then polled in the background."""
        if self._poller is None:
            try:
                self._follow(await self.control.get.remote())
            except Exception as e:  # noqa: BLE001 - the control is restarting: the arguments' values serve meanwhile
                log.warning("router: live settings unavailable (%s); using the arguments'", e)
            if self._poller is None:  # another request may have started it meanwhile
                self._poller = asyncio.get_running_loop().create_task(self._poll())

    def _follow(self, state: dict[str, Any]) -> None:
        """Take the control's live settings unless they are older than those in force (a poll
        sent before an admin change may answer after it)."""
        if state["epoch"] != self.epoch or state["version"] > self.version:
            self.epoch, self.version, self.live = state["epoch"], state["version"], state["live"]

    async def _poll(self) -> None:
        while True:
            try:
                self._follow(await self.control.get.remote())
            except Exception as e:  # noqa: BLE001 - the control replica restarts: keep the last settings
                log.warning(
                    "router: live settings unavailable (%s); keeping version %d", e, self.version
                )
            await asyncio.sleep(POLL_S)

    async def __del__(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        # Shadows still running get a moment; the rest are logged as cut short, not lost.
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.to_thread(self.background.close)

    # ------------------------------------------------------------------------ checks
    def _authorize(self, request: Request, key: str | None, admin: bool = False) -> None:
        if key is None:
            if admin:
                raise ApiError(
                    403, "Admin endpoints are off: set serve.admin_key_env.", code="admin_disabled"
                )
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401,
                "You didn't provide an API key. Provide it in an Authorization header using "
                "Bearer auth (Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        limit = self.serve.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(
                413,
                f"The request body is {declared} bytes; the limit is {limit}.",
                code="request_too_large",
            )
        raw = await request.body()
        if len(raw) > limit:
            raise ApiError(
                413,
                f"The request body is {len(raw)} bytes; the limit is {limit}.",
                code="request_too_large",
            )
        return raw

    # ----------------------------------------------------------------------- targets
    async def _call(
        self,
        target: str,
        messages: list[dict[str, str]],
        max_tokens: int,
        stop: list[str] | None,
        timeout_s: float,
    ) -> Outcome:
        started = time.perf_counter()
        if target == TEACHER_TARGET:
            response = self.teacher.remote(messages, max_tokens, stop)
        elif self.in_process:
            # A coroutine: the timeout scope cancels it (once the forward pass it waits in is
            # done: that holds this loop).
            response = self.in_process[target].answer(target, messages, max_tokens)
        else:
            response = self.students[target].remote(target, messages, max_tokens)
        out = Outcome(target)
        try:
            # A timeout scope, not wait_for: no extra task per call.
            async with asyncio.timeout(timeout_s):
                result = await response
        except TimeoutError:
            if not asyncio.iscoroutine(response):
                response.cancel()
            out.error = ApiError(
                504,
                f"Target '{target}' did not answer within {timeout_s}s.",
                "upstream_timeout",
                code="timeout",
            )
        except Exception as e:  # noqa: BLE001 - a replica that died or raised: a 502, never a hang
            cause = getattr(e, "cause", None) or e  # RayTaskError wraps the replica's exception
            out.error = ApiError(
                502,
                f"Target '{target}' failed: {type(cause).__name__}: {cause}",
                "upstream_error",
                code="upstream_error",
            )
        else:
            if "error" in result:
                err = result["error"]
                kind = "invalid_request_error" if err["status"] == 400 else "upstream_error"
                out.error = ApiError(err["status"], err["message"], kind, code=err["code"])
            else:
                out.reply = Reply(**result)
                if target != TEACHER_TARGET:
                    out.reply = out.reply.cut_at(stop)
                    out.valid = self.answers.valid(out.reply.text)
        out.latency_ms = (time.perf_counter() - started) * 1000
        return out

    def _resolve(self, model: str) -> str | None:
        """The target a request names (None: `auto`); 404 for a model we do not serve."""
        if model == AUTO_MODEL:
            return None
        if model not in self.targets:
            raise ApiError(
                404,
                f"The model `{model}` does not exist or you do not have access to it. Models: "
                f"{', '.join([AUTO_MODEL, *self.targets])}.",
                param="model",
                code="model_not_found",
            )
        return model

    async def _serve(
        self,
        req: Any,
        messages: list[dict[str, str]],
        max_tokens: int,
        request: Request,
        record: dict[str, Any],
    ) -> Served:
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        named = self._resolve(req.model)
        timeout = self.serve.timeout_s
        if named is not None:
            return self._done(Served(await self._call(named, messages, max_tokens, stop, timeout)))
        mode = self.serve.mode
        if mode == "canary":
            header = self.serve.sticky_header
            key = (request.headers.get(header) if header else None) or (
                req.user if header else None
            )
            target = pick(self.live["weights"], key, self.rng)
            return self._done(Served(await self._call(target, messages, max_tokens, stop, timeout)))
        if mode == "shadow":
            sh = self.serve.shadow
            served = self._done(
                Served(await self._call(sh.primary, messages, max_tokens, stop, timeout))
            )
            if (
                served.answer.reply is not None
                and self.rng.random() < self.live["shadow_sample_rate"]
            ):
                record["_shadow"] = (sh.target, messages, max_tokens, stop)
            return served
        # hybrid
        h = self.serve.hybrid
        student = await self._call(h.student, messages, max_tokens, stop, h.student_timeout_s)
        if student.error is not None and student.error.status == 400:
            return self._done(Served(student))  # the request itself is wrong for the student
        reason = fallback_reason(
            student.reply,
            None if student.error is None else _kind_of(student.error),
            bool(student.valid),
            self.live["min_confidence"],
        )
        if reason is None:
            return self._done(Served(student))
        teacher = await self._call(TEACHER_TARGET, messages, max_tokens, stop, timeout)
        served = Served(teacher, fallback=reason, student=student)
        if teacher.error is not None and student.reply is not None:
            # Better the student's unsure answer than an error.
            served = Served(student, fallback=f"{reason}; teacher failed", student=student)
            served.target_errors.append((TEACHER_TARGET, _kind_of(teacher.error)))
        return self._done(served)

    @staticmethod
    def _done(served: Served) -> Served:
        for o in (served.student, served.answer):
            if o is not None and o.error is not None and o.error.status != 400:
                served.target_errors.append((o.target, _kind_of(o.error)))
        served.target_errors = sorted(set(served.target_errors))
        return served

    async def _shadow(self, record: dict[str, Any], primary: Reply) -> None:
        target, messages, max_tokens, stop = record.pop("_shadow")
        try:
            out = await self._call(target, messages, max_tokens, stop, self.serve.timeout_s)
        except asyncio.CancelledError:
            # The replica is stopping: the request and its answer are still logged.
            error = ApiError(503, "shadow cut short: the router replica stopped", code="shutdown")
            out = Outcome(target, error=error)
            self._log_shadow(record, primary, out)
            raise
        self._log_shadow(record, primary, out)

    def _log_shadow(self, record: dict[str, Any], primary: Reply, out: Outcome) -> None:
        record["shadow"] = {
            "target": out.target,
            "status": 200 if out.error is None else out.error.status,
            "answer": None if out.reply is None else out.reply.text,
            "error": None if out.error is None else out.error.message,
            "agree": None
            if out.reply is None
            else self.answers.agree(primary.text, out.reply.text),
            "latency_ms": round(out.latency_ms, 3),
        }
        if out.valid is not None:
            record["_student_outputs"].append((out.target, out.valid))
        if out.error is not None:
            record["_target_errors"].append((out.target, _kind_of(out.error)))
        self.background.put(record)

    # --------------------------------------------------------------------- endpoints
    async def _completion(self, request: Request, kind: Any) -> Response:
        started = time.perf_counter()
        await self._ensure_live()
        chat = kind is ChatRequest
        rid = new_id("chatcmpl" if chat else "cmpl")
        record: dict[str, Any] = {
            "id": rid,
            "ts": time.time(),
            "endpoint": "chat.completions" if chat else "completions",
            "mode": self.serve.mode,
            "request": None,
            "response": None,
            "served_by": None,
            "status": 200,
            "error": None,
            "latency_ms": 0.0,
            "confidence": None,
            "valid": None,
            "fallback": None,
            "shadow": None,
            "_target_errors": [],
            "_student_outputs": [],
        }
        headers = {"x-distill-request-id": rid}  # Serve sets its own x-request-id
        try:
            self._authorize(request, self.api_key)
            req = parse_request(await self._body(request), kind)
            messages = chat_messages(req)
            record["request"] = {
                "model": req.model,
                "messages": messages,
                "max_tokens": req.token_limit(),
                "stop": [req.stop] if isinstance(req.stop, str) else req.stop,
                "stream": req.stream,
                "seed": req.seed,
                "top_p": req.top_p,
                "user": req.user,
            }
            limit = req.token_limit()
            if limit is not None and limit > self.serve.max_new_tokens:
                raise ApiError(
                    400,
                    f"max_tokens is too large: {limit}. This server answers at most "
                    f"{self.serve.max_new_tokens} completion tokens.",
                    param="max_tokens",
                    code="invalid_value",
                )
            served = await self._serve(
                req, messages, limit or self.serve.max_new_tokens, request, record
            )
        except ApiError as e:
            return self._refuse(e, record, headers, started)
        answer = served.answer
        record["served_by"] = answer.target
        record["fallback"] = served.fallback
        record["_target_errors"] = served.target_errors
        for o in (served.student, served.answer):
            if o is not None and o.valid is not None:
                record["_student_outputs"].append((o.target, o.valid))
        headers[TARGET_HEADER] = answer.target
        if served.fallback is not None:
            headers[FALLBACK_HEADER] = served.fallback
        if served.student is not None and served.student.reply is not None:
            record["confidence"] = served.student.reply.confidence
        if answer.error is not None:
            return self._refuse(answer.error, record, headers, started)
        reply = answer.reply
        if record["confidence"] is None:
            record["confidence"] = reply.confidence
        record["valid"] = answer.valid
        record["response"] = chat_body(rid, answer.target, reply)
        record["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        if "_shadow" in record:
            self._spawn(self._shadow(record, reply))  # logged once the shadow has answered
        else:
            self.background.put(record)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            events = (chat_stream if chat else completion_stream)(rid, answer.target, reply, usage)

            async def stream():
                for e in events:
                    yield e

            return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
        body = record["response"] if chat else completion_body(rid, answer.target, reply)
        return JSONResponse(body, headers=headers)

    def _refuse(
        self, e: ApiError, record: dict[str, Any], headers: dict[str, str], started: float
    ) -> JSONResponse:
        record["status"] = e.status
        record["error"] = e.message
        record["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        self.background.put(record)
        if e.status >= 500 or e.status == 429:
            headers["x-should-retry"] = "false"  # the router already gave the target its chance
        if e.status == 401:
            headers["www-authenticate"] = "Bearer"
        return JSONResponse(status_code=e.status, content=e.body(), headers=headers)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._completion(request, ChatRequest)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._completion(request, CompletionRequest)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request, self.api_key)
        except ApiError as e:
            return JSONResponse(status_code=e.status, content=e.body())
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": n, "object": "model", "created": 0, "owned_by": "distill"}
                    for n in [AUTO_MODEL, *self.targets]
                ],
            }
        )

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/admin/live")
    async def get_live(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request, self.admin_key, admin=True)
        except ApiError as e:
            return JSONResponse(status_code=e.status, content=e.body())
        state = await self.control.get.remote()
        return JSONResponse({"version": state["version"], "live": state["live"]})

    @api.put("/admin/live")
    async def put_live(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request, self.admin_key, admin=True)
            changes = json.loads((await self._body(request)).decode("utf-8"))
            if not isinstance(changes, dict):
                raise ApiError(400, "The body must be a JSON object of live settings.")
        except ApiError as e:
            return JSONResponse(status_code=e.status, content=e.body())
        except (ValueError, UnicodeDecodeError) as e:
            return JSONResponse(status_code=400, content=error_body(f"The body is not JSON: {e}"))
        result = await self.control.update.remote(changes)
        if "error" in result:
            return JSONResponse(
                status_code=400, content=error_body(result["error"], code="invalid_value")
            )
        self._follow(result)  # this replica at once, the others at their next poll
        return JSONResponse({"version": result["version"], "live": result["live"]})

    @api.get("/admin/stats")
    async def stats(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request, self.admin_key, admin=True)
        except ApiError as e:
            return JSONResponse(status_code=e.status, content=e.body())
        await asyncio.to_thread(self.background.flush)
        return JSONResponse(
            {
                "live": {"version": self.version, **self.live},
                "counts": self.metrics.counts,
                "log_failed_records": self.background.failed,
                "drift": None
                if self.drift is None
                else {k: v for k, v in self.drift.snapshot().items()},
            }
        )


# ------------------------------------------------------------------------------------ builder
def _options(
    r: ReplicaSection, num_cpus: float, num_gpus: float, shutdown_s: float
) -> dict[str, Any]:
    a = r.autoscaling
    scale: dict[str, Any] = (
        {"num_replicas": a.min_replicas}
        if a.min_replicas == a.max_replicas
        else {
            "autoscaling_config": {
                "min_replicas": a.min_replicas,
                "max_replicas": a.max_replicas,
                "target_ongoing_requests": a.target_ongoing_requests,
            }
        }
    )
    return {
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": r.max_ongoing_requests,
        # Stop fast: Ctrl-C on `distill serve` ends within seconds, not Serve's 20 s default.
        "graceful_shutdown_timeout_s": shutdown_s,
        "graceful_shutdown_wait_loop_s": min(0.25, shutdown_s),
        **scale,
    }


def app(args: dict[str, Any]) -> serve.Application:
    """Application builder: the students (one deployment per group sharing a base, or in
    the router's replicas: ``serve.student_placement``), the teacher proxy (and its shared
    quota when a rate limit or budget is set), the live settings and the router in front."""
    a = AppArgs.model_validate(args)
    s = a.serve
    # The live settings and the quota hold a few numbers: no CPU reserved for them (Serve's
    # default is one each, which on a small node can leave the students none).
    light = {"num_cpus": 0}
    handles: dict[str, Any] = {}
    in_router = s.student_placement == "router"
    for group in [] if in_router else student_groups(a.students):
        first = next(iter(group))
        node = StudentDeployment.options(
            name=f"Student-{first}",
            **_options(s.student, s.student.num_cpus, s.student.num_gpus, s.shutdown_timeout_s),
        ).bind(group, s.batching.max_batch_size, s.batching.wait_timeout_s, s.max_new_tokens)
        handles.update({name: node for name in group})
    t = a.teacher
    quota = None
    if t.rate_limit.rpm or t.rate_limit.tpm or t.budget.max_cost_usd or t.budget.max_tokens:
        quota = TeacherQuota.options(
            ray_actor_options=light,
            graceful_shutdown_wait_loop_s=0.25,
            graceful_shutdown_timeout_s=s.shutdown_timeout_s,
        ).bind(
            a.teacher_base_url.rstrip("/"),
            t.rate_limit.rpm,
            t.rate_limit.tpm,
            t.budget.max_cost_usd,
            t.budget.max_tokens,
        )
    teacher = TeacherProxy.options(
        name="Teacher",
        **_options(s.teacher, s.teacher.num_cpus, s.teacher.num_gpus or 0, s.shutdown_timeout_s),
    ).bind(t.model_dump(mode="json"), a.teacher_base_url, a.teacher_api_key_env, quota)
    # The live settings' starting values; a config file's RouterControl user_config wins.
    control = RouterControl.options(
        user_config=live_settings(s),
        ray_actor_options=light,
        graceful_shutdown_wait_loop_s=0.25,
        graceful_shutdown_timeout_s=s.shutdown_timeout_s,
    ).bind(s.model_dump(mode="json"))
    # A router replica holding the students reserves what a student replica would as well.
    cpus = s.router.num_cpus + (s.student.num_cpus if in_router else 0)
    gpus = (s.router.num_gpus or 0) + (s.student.num_gpus if in_router else 0)
    return Router.options(**_options(s.router, cpus, gpus, s.shutdown_timeout_s)).bind(
        a.model_dump(mode="json"), handles, teacher, control
    )
