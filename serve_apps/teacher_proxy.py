"""The teacher behind Ray Serve: forwards chat completions to the OpenAI-compatible teacher."""

import os
from typing import Any

from ray import serve

from serve_apps.completions import completion

_PASSED_ON = (
    "temperature",
    "max_tokens",
    "max_completion_tokens",
    "top_p",
    "n",
    "stop",
    "seed",
    "response_format",
)


# Waiting on the teacher costs nothing: many requests per replica.
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
class TeacherProxy:
    """The API key is read from the replica's environment (``api_key_env``), never passed
    through the Serve config, which Serve stores."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_attempts: int = 3,
    ):
        self.base_url = base_url
        self.model = model
        key = os.environ.get(api_key_env) if api_key_env else "none"
        if not key:
            raise RuntimeError(
                f"environment variable {api_key_env} (the teacher's API key) is not set on this replica"
            )
        self.api_key = key
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self._client = None

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        from ray_pipeline.teacher.client import TeacherClient

        if self._client is None:  # created on the replica's event loop
            self._client = TeacherClient(
                self.base_url,
                self.model,
                self.api_key,
                timeout_s=self.timeout_s,
                max_attempts=self.max_attempts,
            )
        params = {k: body[k] for k in _PASSED_ON if body.get(k) is not None}
        reply = await self._client.complete(body["messages"], **params)
        return completion(reply.model, reply.texts[0], reply.prompt_tokens, reply.completion_tokens)
