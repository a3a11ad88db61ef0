"""The student behind Ray Serve: greedy answers from a distilled checkpoint, batched."""

import asyncio
from typing import Any

from ray import serve

from serve_apps.completions import completion


# Enough requests per replica to fill a batch of 16.
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class StudentModel:
    """Loads the checkpoint once per replica; concurrent requests are batched into one
    ``generate`` call (run in a thread, so the replica keeps accepting requests)."""

    def __init__(self, checkpoint: str, name: str = "student", max_new_tokens: int = 64):
        from ray_pipeline.train.student import Student

        self.student = Student.load(checkpoint)
        self.name = name
        self.max_new_tokens = max_new_tokens

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _answer(self, requests: list[tuple[list[dict[str, Any]], int]]) -> list[str]:
        max_new = max(n for _, n in requests)
        answers = await asyncio.to_thread(self.student.answer, [m for m, _ in requests], max_new)
        return [a.text for a in answers]

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        max_new = min(
            int(body.get("max_tokens") or body.get("max_completion_tokens") or self.max_new_tokens),
            self.max_new_tokens,
        )
        text = await self._answer((body["messages"], max_new))
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        completion_tokens = len(text.split())
        return completion(self.name, text, prompt_tokens, completion_tokens, "stop")
