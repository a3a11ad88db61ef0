"""The OpenAI wire format as the router speaks it: strict request validation, error objects,
and the response bodies (JSON and server-sent events). Plain Python, no Ray.

Validation is as strict as OpenAI's own: every problem is a 4xx with an OpenAI-style error
object (``{"error": {"message", "type", "param", "code"}}``) naming the parameter, never a 5xx.
A request body must be UTF-8 JSON holding an object; strings must be valid Unicode (a JSON
escape of a lone surrogate, ``"\\ud800"``, is refused); unknown parameters are refused
("Unrecognized request argument supplied"); parameters a student cannot honour are refused
with ``unsupported_value`` rather than ignored:

* ``n`` must be 1 and ``temperature`` 0 (or absent): students answer greedily, so more samples
  would be copies and a temperature would be ignored. ``top_p`` is accepted: the greedy token
  is inside every nucleus. ``seed`` is accepted: greedy answers are deterministic.
* ``logprobs``/``top_logprobs``, penalties, ``logit_bias``, tools and functions, response
  formats other than text, audio and the like are refused.
* ``stop`` (up to 4 strings) is implemented: the answer is cut before the first one.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_STOP = 4
# Parameters OpenAI knows that no student can honour: a clear refusal, not "unrecognized".
UNSUPPORTED = (
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "service_tier",
)


class ApiError(Exception):
    """A request the router answers with an error object (``body``) and an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------------------- request models
class _Strict(BaseModel):
    # strict: no "5" for 5, no 1.0 for an int, no true for 1; extra: unknown keys are errors.
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _Common(_Strict):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None

    @model_validator(mode="after")
    def _common_rules(self) -> _Common:
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise _Refusal("stop", f"at most {MAX_STOP} stop sequences, got {len(self.stop)}")
        if self.stream_options is not None and not self.stream:
            raise _Refusal("stream_options", "stream_options is only allowed when stream is true")
        if self.n not in (None, 1):
            raise _Unsupported("n", "n must be 1: students answer greedily (more would be copies)")
        if self.temperature not in (None, 0):
            raise _Unsupported(
                "temperature", "students answer greedily: temperature must be 0 or left out"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise _Unsupported(name, f"{name} is not supported: it must be 0 or left out")
        if self.logit_bias:
            raise _Unsupported("logit_bias", "logit_bias is not supported")
        return self


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @model_validator(mode="after")
    def _chat_rules(self) -> ChatRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise _Refusal("max_tokens", "give max_tokens or max_completion_tokens, not both")
        if self.logprobs or self.top_logprobs is not None:
            param = "logprobs" if self.logprobs else "top_logprobs"
            raise _Unsupported(param, "logprobs are not supported by this server")
        if self.response_format is not None and self.response_format.type != "text":
            raise _Unsupported(
                "response_format", f"response_format {self.response_format.type!r} is not supported"
            )
        if self.store:
            raise _Unsupported("store", "store is not supported: every request is logged anyway")
        if not any(m.role == "user" for m in self.messages):
            raise _Refusal("messages", "messages must contain at least one 'user' message")
        return self

    def token_limit(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class CompletionRequest(_Common):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1, le=20)
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_rules(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise _Unsupported("prompt", f"one prompt per request, got {len(self.prompt)}")
        if self.logprobs is not None:
            raise _Unsupported("logprobs", "logprobs are not supported by this server")
        for name in ("echo", "suffix"):
            if getattr(self, name):
                raise _Unsupported(name, f"{name} is not supported")
        if self.best_of not in (None, 1):
            raise _Unsupported("best_of", "best_of must be 1: students answer greedily")
        return self

    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class _Refusal(ValueError):
    """A rule across fields was broken (400, invalid_value)."""

    code = "invalid_value"

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class _Unsupported(_Refusal):
    code = "unsupported_value"


# ------------------------------------------------------------------------------ parsing a body
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_TYPE_TAG = re.compile(r"[\[\-]|^(str|int|float|bool|list|dict|none)$")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _loads(raw: bytes) -> Any:
    """JSON of a body, strictly: UTF-8, no NaN/Infinity, no lone surrogates."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(
            400,
            f"The request body is not valid UTF-8: byte 0x{raw[e.start]:02x} at position {e.start}.",
            code="invalid_encoding",
        ) from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(
            400,
            f"We could not parse the JSON body of your request ({e}). The body must be a JSON "
            "object.",
            code="invalid_json",
        ) from None
    if _SURROGATE_ESCAPE.search(raw):
        where = _lone_surrogate(data, "")
        if where is not None:
            raise ApiError(
                400,
                f"Invalid Unicode in '{where or 'body'}': a lone surrogate escape "
                "(e.g. \\ud800) is not a character.",
                param=where or None,
                code="invalid_encoding",
            )
    return data


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string (or key) holding a lone surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _lone_surrogate(v, f"{path}[{i}]")
            if found is not None:
                return found
    if isinstance(value, dict):
        for k, v in value.items():
            found = _lone_surrogate(k, path) or _lone_surrogate(v, f"{path}.{k}" if path else k)
            if found is not None:
                return found
    return None


def _param(loc: tuple[Any, ...]) -> str:
    """pydantic's error location as OpenAI names a parameter: messages[0].content."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.search(part):
            out += f".{part}" if out else part
    return out


def _validation_error(e: ValidationError) -> ApiError:
    # The most specific problem: inside a union (content: str | parts) the branch that got
    # furthest names the real mistake (messages[0].content[0].type, not "not a string").
    err = max(e.errors(), key=lambda x: len(x["loc"]))
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _Refusal):
        return ApiError(400, str(ctx_error), param=ctx_error.param, code=ctx_error.code)
    param = _param(err["loc"])
    if err["type"] == "extra_forbidden":
        if param in UNSUPPORTED:
            return ApiError(
                400,
                f"'{param}' is not supported by this server.",
                param=param,
                code="unsupported_parameter",
            )
        return ApiError(
            400,
            f"Unrecognized request argument supplied: {param}",
            param=param,
            code="unrecognized_argument",
        )
    if err["type"] == "missing":
        return ApiError(
            400,
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )
    got = err.get("input")
    shown = (
        json.dumps(got)[:80]
        if isinstance(got, str | int | float | bool | None)
        else type(got).__name__
    )
    return ApiError(
        400,
        f"Invalid value for '{param}': {err['msg']} (got {shown}).",
        param=param,
        code="invalid_value",
    )


def parse_request(
    raw: bytes, kind: type[ChatRequest] | type[CompletionRequest]
) -> ChatRequest | CompletionRequest:
    """A request body, validated (see the module docstring), or an ApiError."""
    data = _loads(raw)
    if not isinstance(data, dict):
        raise ApiError(
            400,
            f"The request body must be a JSON object, got {type(data).__name__}.",
            code="invalid_json",
        )
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def chat_messages(req: ChatRequest | CompletionRequest) -> list[dict[str, str]]:
    """The conversation a target answers, as plain role/content dicts (text parts joined; a
    completion's prompt becomes one user message)."""
    if isinstance(req, CompletionRequest):
        return [{"role": "user", "content": req.prompt_text()}]
    return [{"role": m.role, "content": m.text()} for m in req.messages]


# ----------------------------------------------------------------------------------- answers
@dataclass
class Reply:
    """One target's answer, whatever the target (a student or the teacher)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    confidence: float | None = None  # students only
    probs: dict[str, float] | None = None  # classifier students only

    def cut_at(self, stop: str | list[str] | None) -> Reply:
        """The answer cut before the first stop sequence (finish_reason stays 'stop')."""
        if not stop:
            return self
        stops = [stop] if isinstance(stop, str) else stop
        cuts = [i for i in (self.text.find(s) for s in stops if s) if i >= 0]
        if not cuts:
            return self
        return Reply(
            self.text[: min(cuts)],
            self.prompt_tokens,
            self.completion_tokens,
            "stop",
            self.confidence,
            self.probs,
        )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _usage(reply: Reply) -> dict[str, int]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }


def chat_body(request_id: str, model: str, reply: Reply) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "finish_reason": reply.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": _usage(reply),
    }


def completion_body(request_id: str, model: str, reply: Reply) -> dict[str, Any]:
    """A ``text_completion`` object."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "text": reply.text, "finish_reason": reply.finish_reason, "logprobs": None}
        ],
        "usage": _usage(reply),
    }


_PIECES = re.compile(r"\s*\S+|\s+")


def pieces(text: str) -> list[str]:
    """The answer in word-sized pieces for streaming (joined they give the text back)."""
    return _PIECES.findall(text)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def chat_stream(request_id: str, model: str, reply: Reply, include_usage: bool) -> list[str]:
    """The server-sent events of a streamed chat completion: a role delta, one delta per
    piece, the finish reason, the usage chunk when asked for, and ``[DONE]``."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        c = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if include_usage:
            c["usage"] = None
        return c

    events = [_sse(chunk({"role": "assistant", "content": ""}, None))]
    events += [_sse(chunk({"content": p}, None)) for p in pieces(reply.text)]
    events.append(_sse(chunk({}, reply.finish_reason)))
    if include_usage:
        events.append(
            _sse(
                {
                    "id": request_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(reply),
                }
            )
        )
    events.append("data: [DONE]\n\n")
    return events


def completion_stream(request_id: str, model: str, reply: Reply, include_usage: bool) -> list[str]:
    """The server-sent events of a streamed text completion."""
    created = int(time.time())

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        c = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        }
        if include_usage:
            c["usage"] = None
        return c

    events = [_sse(chunk(p, None)) for p in pieces(reply.text)]
    events.append(_sse(chunk("", reply.finish_reason)))
    if include_usage:
        events.append(
            _sse(
                {
                    "id": request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(reply),
                }
            )
        )
    events.append("data: [DONE]\n\n")
    return events
