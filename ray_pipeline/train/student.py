"""A trained student, loaded from its checkpoint directory, answering chat messages.

Evaluation and the Ray Serve student deployment use exactly::

    student = Student.load(path)
    answers = student.complete(list_of_message_lists, max_new_tokens=N)

Prompts are rendered by the checkpoint's own tokenizer and chat template, the same way they
were rendered for training (``ray_pipeline.train.data.render_prompt``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray_pipeline.train.checkpoint import load_model, read_meta
from ray_pipeline.train.data import render_prompt


class Student:
    """Tokenizer + model (eval mode) + the checkpoint's metadata (``meta``)."""

    def __init__(self, model: Any, tokenizer: Any, meta: dict[str, Any], device: str):
        self.model = model
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = device
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

    def complete(
        self, messages_batch: list[list[dict]], max_new_tokens: int = 32, batch_size: int = 32
    ) -> list[str]:
        """Greedy answers, one per message list, decoded from the new tokens only (special
        tokens skipped). Runs in chunks of `batch_size`."""
        if not messages_batch:
            return []
        return [
            text
            for text, _ in self._generate(messages_batch, max_new_tokens, batch_size, scores=False)
        ]

    def complete_with_scores(
        self, messages_batch: list[list[dict]], max_new_tokens: int = 32, batch_size: int = 32
    ) -> list[tuple[str, float]]:
        """Greedy answers with the probability the model gives its own answer (the product of
        its token probabilities, end-of-sequence included): a confidence for routing."""
        if not messages_batch:
            return []
        return [
            (text, float(p))
            for text, p in self._generate(messages_batch, max_new_tokens, batch_size, scores=True)
        ]


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
