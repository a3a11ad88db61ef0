"""A trained student, loaded from its checkpoint directory, answering chat messages.

Evaluation and the Ray Serve student deployment use exactly::

    student = Student.load(path)
    answers = student.answer(list_of_message_lists, max_new_tokens=N)

Every answer is the task's answer format (for a label task the teacher's JSON, e.g.
``{"is_bad": 1}``) plus a confidence, whatever the kind of student:

* a causal LM writes the answer greedily after the chat prompt, rendered by the checkpoint's
  own tokenizer and chat template exactly as in training; its confidence is the probability
  it gives its own answer (the product of its token probabilities, end-of-sequence included);
* a classifier reads the input text (recovered from the messages by the task's prompt) and
  gives every class a probability; a binary classifier says the positive label when that
  label's probability reaches the checkpoint's threshold (chosen on the validation split);
  its confidence is the probability of the label it says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_pipeline.data.prompts import Prompt, last_user_content
from ray_pipeline.train.checkpoint import load_model, read_meta
from ray_pipeline.train.data import render_prompt
from ray_pipeline.train.model import CAUSAL_LM, CLASSIFIER


@dataclass(frozen=True)
class Answer:
    text: str  # the task's answer format
    confidence: float | None  # probability of this answer
    probs: dict[str, float] | None = None  # classifier: every label's probability


def answer_text(label_key: str, label: str) -> str:
    """A label in the teacher's answer format: {"<label_key>": 1} (numbers as numbers)."""
    value: Any = label
    try:
        value = int(label)
    except ValueError:
        value = label  # a word label stays a string
    return json.dumps({label_key: value})


class Student:
    """Tokenizer + model (eval mode) + the checkpoint's metadata (``meta``)."""

    def __init__(self, model: Any, tokenizer: Any, meta: dict[str, Any], device: str):
        self.model = model
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = device
        self.kind = meta.get("kind", CAUSAL_LM)
        prompt = meta.get("prompt")
        self.prompt = (
            Prompt(prompt["template"], prompt["placeholder"], prompt.get("system"))
            if prompt
            else None
        )
        # Longest prompt + answer the model takes (tiny: its config; hub models: their config).
        self.max_positions: int | None = getattr(model.config, "max_position_embeddings", None)

    @classmethod
    def load(
        cls, checkpoint_dir: str | Path, device: str | None = None, *, merge: bool = True
    ) -> Student:
        """Load a checkpoint written by the train stage. `device` defaults to cuda when
        available, else cpu. LoRA adapters are merged into the weights unless `merge=False`."""
        import torch
        from transformers import AutoTokenizer

        meta = read_meta(checkpoint_dir)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = AutoTokenizer.from_pretrained(Path(checkpoint_dir) / "tokenizer")
        model = load_model(checkpoint_dir, meta, merge=merge).to(device).eval()
        return cls(model, tokenizer, meta, device)

    def _encode_prompts(
        self, messages_batch: list[list[dict]], max_new_tokens: int
    ) -> list[list[int]]:
        """Token ids of each rendered prompt, cut from the left so prompt + answer fit."""
        if self.max_positions is not None and max_new_tokens >= self.max_positions:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt: the model takes "
                f"{self.max_positions} positions"
            )
        texts = [render_prompt(self.tokenizer, m) for m in messages_batch]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        if self.max_positions is None:
            return ids
        room = self.max_positions - max_new_tokens
        return [p[-room:] if len(p) > room else p for p in ids]

    def _generate(
        self, messages_batch: list[list[dict]], max_new_tokens: int, batch_size: int, scores: bool
    ) -> list[tuple[str, float | None]]:
        import torch

        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        prompts = self._encode_prompts(messages_batch, max_new_tokens)
        out: list[tuple[str, float | None]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            longest = max(len(p) for p in chunk)
            # Left padding: every prompt ends where generation starts.
            ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, longest - len(p) :] = torch.as_tensor(p, dtype=torch.long)
                mask[i, longest - len(p) :] = 1
            with torch.inference_mode():
                gen = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                    eos_token_id=tok.eos_token_id,
                    output_scores=scores,
                    return_dict_in_generate=True,
                )
            new_tokens = gen.sequences[:, longest:]
            texts = tok.batch_decode(new_tokens, skip_special_tokens=True)
            probs: list[float | None] = [None] * len(chunk)
            if scores:
                probs = _sequence_probs(gen.scores, new_tokens, tok.eos_token_id)
            out.extend(zip(texts, probs, strict=True))
        return out

    def answer(
        self, messages_batch: list[list[dict]], max_new_tokens: int = 32, batch_size: int = 32
    ) -> list[Answer]:
        """One answer with its confidence per message list (see the module docstring)."""
        if not messages_batch:
            return []
        if self.kind == CLASSIFIER:
            texts = [self.input_text(m) for m in messages_batch]
            return [self._label_answer(p) for p in self.class_probs(texts, batch_size)]
        return [
            Answer(text, float(p))
            for text, p in self._generate(messages_batch, max_new_tokens, batch_size, scores=True)
        ]

    def complete(
        self, messages_batch: list[list[dict]], max_new_tokens: int = 32, batch_size: int = 32
    ) -> list[str]:
        """The answers' texts alone."""
        return [a.text for a in self.answer(messages_batch, max_new_tokens, batch_size)]

    # -------------------------------------------------------------------- classifiers
    def input_text(self, messages: list[dict]) -> str:
        """The input a classifier reads: the task prompt's slot in the last user message (the
        whole message when it is not in the task's prompt)."""
        user = last_user_content(messages) or ""
        extracted = self.prompt.extract(user) if self.prompt is not None else None
        return extracted if extracted is not None else user

    def class_probs(self, texts: list[str], batch_size: int = 32) -> list[list[float]]:
        """Every label's probability (in the order of the checkpoint's labels) per text."""
        import torch

        out: list[list[float]] = []
        # Inputs are cut where training cut them (and never past the model's positions).
        limits = [self.max_positions, (self.meta.get("train") or {}).get("max_seq_len")]
        limit = min((x for x in limits if x), default=None)
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                texts[start : start + batch_size],
                truncation=limit is not None,
                max_length=limit,
                padding=True,
                return_tensors="pt",
            )
            with torch.inference_mode():
                logits = self.model(
                    input_ids=enc["input_ids"].to(self.device),
                    attention_mask=enc["attention_mask"].to(self.device),
                ).logits
            out.extend(torch.softmax(logits.float(), dim=-1).tolist())
        return out

    def _label_answer(self, probs: list[float]) -> Answer:
        labels = self.meta["labels"]
        threshold = self.meta.get("threshold")
        if threshold is not None:
            positive = labels.index(threshold["positive_label"])
            negative = 1 - positive
            index = positive if probs[positive] >= threshold["value"] else negative
        else:
            index = max(range(len(probs)), key=probs.__getitem__)
        return Answer(
            answer_text(self.meta["label_key"], labels[index]),
            probs[index],
            dict(zip(labels, probs, strict=True)),
        )


def _sequence_probs(step_scores: tuple[Any, ...], new_tokens: Any, eos_id: int) -> list[float]:
    """exp(sum of log-probs) of each row's generated tokens, up to and including its first eos
    (the padding generate adds after a finished row is not part of the answer)."""
    import torch

    logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in step_scores], dim=1)
    token_lp = logprobs.gather(-1, new_tokens[:, : logprobs.shape[1]].unsqueeze(-1)).squeeze(-1)
    is_eos = new_tokens[:, : logprobs.shape[1]] == eos_id
    # A position counts while no eos came before it (the eos itself counts).
    before_eos = torch.cumsum(is_eos.long(), dim=1) - is_eos.long() == 0
    return torch.exp((token_lp * before_eos).sum(dim=1)).tolist()
