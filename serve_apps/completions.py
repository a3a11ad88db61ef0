"""OpenAI chat-completion bodies and the request log, shared by the Serve apps."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from openai.types.chat import ChatCompletion
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_message import ChatCompletionMessage
from openai.types.completion_usage import CompletionUsage


def completion(
    model: str, text: str, prompt_tokens: int, completion_tokens: int, finish_reason: str = "stop"
) -> dict[str, Any]:
    """A ChatCompletion body (built with the openai client's own types, so it is valid)."""
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=[
            Choice(
                index=0,
                finish_reason=finish_reason,
                message=ChatCompletionMessage(role="assistant", content=text),
            )
        ],
        usage=CompletionUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    ).model_dump(exclude_none=True)


def error_body(message: str, kind: str, status: int, **extra: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": status, **extra}}


class RequestLog:
    """Append-only JSONL log of served requests, in the format the generate stage reads
    (``{"request": {...}, "response": {...}}``, plus ``served_by``), so the next distillation
    round starts from production traffic.

    One ``os.write`` per record on an O_APPEND descriptor: records from several replicas
    sharing a local file do not interleave. On NFS give each replica its own file.
    """

    def __init__(self, path: str | os.PathLike):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self._lock:
            written = os.write(self._fd, data)
            while written < len(data):
                written += os.write(self._fd, data[written:])

    def close(self) -> None:
        os.close(self._fd)
