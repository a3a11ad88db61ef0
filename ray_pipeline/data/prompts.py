"""Turning an input into the chat messages the teacher (and later the student) sees, and back."""

from __future__ import annotations

import hashlib

from ray_pipeline.config import TaskSection


class Prompt:
    """A task's prompt template, read once: render inputs into messages, recover inputs."""

    def __init__(self, template: str, placeholder: str = "{input}", system: str | None = None):
        if placeholder not in template:
            raise ValueError(f"prompt template has no placeholder {placeholder!r}")
        self.template = template
        self.placeholder = placeholder
        self.system = system
        self._prefix, _, self._suffix = template.partition(placeholder)
        self.hash = hashlib.sha256(f"{system or ''}\x00{template}".encode()).hexdigest()[:12]

    @classmethod
    def from_task(cls, task: TaskSection) -> Prompt:
        return cls(task.prompt.text(), task.prompt.placeholder, task.prompt.system)

    def messages(self, text: str) -> list[dict[str, str]]:
        # str.replace, not str.format: templates hold JSON braces.
        user = self.template.replace(self.placeholder, text, 1)
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return [*msgs, {"role": "user", "content": user}]

    def extract(self, prompt_text: str) -> str | None:
        """The input inside a rendered prompt, or None when the text is not this template."""
        if (
            len(prompt_text) >= len(self._prefix) + len(self._suffix)
            and prompt_text.startswith(self._prefix)
            and prompt_text.endswith(self._suffix)
        ):
            return prompt_text[len(self._prefix) : len(prompt_text) - len(self._suffix)]
        return None


def last_user_content(messages: list[dict]) -> str | None:
    for m in reversed(messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return None
