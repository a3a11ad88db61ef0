"""Soft targets for logit distillation: a row's ``teacher_logprobs`` (the teacher's answer
tokens, each with its top-k alternatives: ``[{"token", "logprob", "top": [[token, logprob],
...]}]``) made into targets for the student, and the divergences against them.

* a classifier student learns the teacher's distribution over the task's labels, read where
  the teacher wrote the label (``label_distribution`` -> ``class_soft_loss``);
* a causal-LM student learns the teacher's top-k at every answer token, which needs each
  teacher token to be one student token (``token_alignment`` -> ``top_k_tensors`` ->
  ``soft_target_loss``). Where it is not, the run must refuse: a KL against tokens of another
  vocabulary trains on garbage.

Both losses are ``temperature**2 * divergence(teacher_T || student_T)`` (Hinton et al.: the
squared temperature keeps the gradients' scale when the temperature changes), mixed with the
cross-entropy on the teacher's answer by the training loop.

Plain functions; torch is imported inside the ones that need it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ray_pipeline.data.schema import normalize_label

KINDS = ("kl", "jsd")
# Stands in for log(0) (a padded alternative, a class the teacher gives no mass): finite, so
# that 0 * (log q - log p) is 0 and not nan, in the loss and in its gradient.
_LOG_ZERO = -1e9


def label_distribution(
    teacher_logprobs: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    aliases: Mapping[str, str] | None = None,
) -> list[float] | None:
    """The teacher's probability of each of `labels` (in their order), read at the first
    answer token whose chosen token is a label (stripped and normalised like the parser's
    labels, with the task's `aliases`): its alternatives that are labels, renormalised (a
    softmax over their logprobs; spellings of one label add up). Labels absent from the top-k
    get 0; a chosen token with no label among its alternatives gets 1.0.

    None when no answer token is a label (then the row has no soft label). The first label
    token is taken as the verdict: an answer whose reasoning writes a label value before the
    verdict reads the wrong position."""
    aliases = dict(aliases or {})
    labels = list(labels)
    for position in teacher_logprobs:
        if normalize_label(position["token"], labels, aliases) is None:
            continue
        # The chosen token counts with its own logprob even when the top-k leaves it out
        # (top_logprobs 0, or a sampled token outside the top-k).
        candidates = {tok: lp for tok, lp in position["top"]}
        candidates.setdefault(position["token"], position["logprob"])
        by_label: dict[str, list[float]] = {}
        for token, logprob in candidates.items():
            label = normalize_label(token, labels, aliases)
            if label is not None:
                by_label.setdefault(label, []).append(logprob)
        top = max(lp for lps in by_label.values() for lp in lps)
        mass = {lab: sum(math.exp(lp - top) for lp in lps) for lab, lps in by_label.items()}
        total = sum(mass.values())
        return [mass.get(lab, 0.0) / total for lab in labels]
    return None


def _single_id(tokenizer: Any, token: str) -> int | None:
    """The student's one token id for a teacher token, or None when the student's tokenizer
    makes it zero, several, or its unknown token."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or (tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id):
        return None
    return ids[0]


def _logaddexp(a: float, b: float) -> float:
    top = max(a, b)
    return top + math.log(math.exp(a - top) + math.exp(b - top))


def token_alignment(
    tokenizer: Any, teacher_logprobs: Sequence[Mapping[str, Any]], answer_ids: Sequence[int]
) -> list[list[tuple[int, float]]]:
    """For a causal-LM student whose answer is the token ids `answer_ids` (a trailing eos is
    ignored: the teacher's answer has none), each teacher position's top-k as (student token
    id, teacher logprob), most likely first, the chosen token always included.

    Every chosen teacher token must be exactly one student token, and together they must be
    `answer_ids`; otherwise ``ValueError`` names the first token that does not map (the run
    refuses rather than train on logprobs of another vocabulary). An alternative that is not
    exactly one student token is dropped, its mass lost: the teacher's distribution is then
    renormalised over the alternatives that remain (``soft_target_loss``)."""
    ids = list(answer_ids)
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        ids.pop()
    # The logprobs are of the teacher's answer as returned: they apply to a student that
    # learns that very text (train.target 'raw'), token for token.
    differ = "the student's answer is not the teacher's, token for token (train.target 'raw'?)"
    out = []
    for i, position in enumerate(teacher_logprobs):
        token = position["token"]
        student_id = _single_id(tokenizer, token)
        if student_id is None:
            pieces = tokenizer.encode(token, add_special_tokens=False)
            what = (
                "the student's unknown token"
                if len(pieces) == 1
                else f"{len(pieces)} student tokens {pieces}, not one"
            )
            raise ValueError(
                f"teacher token {i} {token!r} is {what}: the teacher's vocabulary does not map "
                "onto the student's here, so its logprobs cannot be soft targets"
            )
        if i >= len(ids) or ids[i] != student_id:
            there = f"token {ids[i]}" if i < len(ids) else "nothing"
            raise ValueError(
                f"teacher token {i} {token!r} is student token {student_id}, but the student's "
                f"answer has {there} there: {differ}"
            )
        alternatives: dict[int, float] = {}
        for alt, logprob in position["top"]:
            alt_id = _single_id(tokenizer, alt)
            if alt_id is None:
                continue
            # Two spellings one student token (a normalising tokenizer): their mass adds up.
            before = alternatives.get(alt_id)
            alternatives[alt_id] = logprob if before is None else _logaddexp(before, logprob)
        alternatives.setdefault(student_id, position["logprob"])
        out.append(sorted(alternatives.items(), key=lambda kv: -kv[1]))
    if len(out) != len(ids):
        raise ValueError(
            f"the teacher's answer ends after {len(out)} tokens, the student's has {len(ids)}: "
            f"{differ}"
        )
    return out


def top_k_tensors(positions: Sequence[Sequence[tuple[int, float]]], k: int | None = None) -> Any:
    """(ids [N, K] long, logprobs [N, K] float) of ``token_alignment``'s positions, the K
    most likely of each (K: the longest, or `k`), padded with id -1 (``soft_target_loss``)."""
    import torch

    width = k if k is not None else max((len(p) for p in positions), default=0)
    ids = torch.full((len(positions), width), -1, dtype=torch.long)
    logprobs = torch.zeros((len(positions), width), dtype=torch.float32)
    for row, position in enumerate(positions):
        for col, (token_id, logprob) in enumerate(position[:width]):
            ids[row, col], logprobs[row, col] = token_id, logprob
    return ids, logprobs


def _check(kind: str, temperature: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _divergence(log_q: Any, log_p: Any, kind: str) -> Any:
    """Per row: KL(q || p) or the Jensen-Shannon divergence of q and p, from finite log
    probabilities [N, K] (0-probability entries hold _LOG_ZERO)."""
    import torch

    if kind == "kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    log_m = torch.logaddexp(log_q, log_p) - math.log(2.0)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    return 0.5 * (kl_qm + kl_pm)


def _masked_mean(per_row: Any, weight: Any) -> Any:
    # Rows out of the mask add nothing (no row at all: 0, still part of the graph).
    return (per_row * weight).sum() / weight.sum().clamp_min(1.0)


def soft_target_loss(
    student_logits: Any,
    target_ids: Any,
    target_logprobs: Any,
    mask: Any,
    kind: str = "kl",
    temperature: float = 1.0,
) -> Any:
    """temperature² x the mean over the rows in `mask` [N] of divergence(teacher || student)
    on each row's teacher top-k (`target_ids` [N, K] student token ids, -1 for padding;
    `target_logprobs` [N, K] the teacher's logprobs) against `student_logits` [N, V].

    The teacher's distribution is its top-k renormalised, softmax(logprobs / T): the tail
    beyond the top-k is unknown. The student's is restricted to the same K ids and
    renormalised, softmax(logits[ids] / T), so that both live on the same support and the
    divergence is 0 exactly when they agree there; how much mass the student keeps outside
    the top-k is left to the cross-entropy term on the teacher's answer. `kind`: 'kl' =
    KL(teacher || student); 'jsd' = Jensen-Shannon (symmetric, at most ln 2). A row with no
    target id adds nothing. Computed in float32."""
    import torch

    _check(kind, temperature)
    valid = target_ids >= 0
    logits = student_logits.float().gather(-1, target_ids.clamp_min(0))
    logits = torch.where(valid, logits / temperature, _LOG_ZERO)
    teacher = torch.where(valid, target_logprobs.float() / temperature, _LOG_ZERO)
    per_row = _divergence(
        torch.log_softmax(teacher, -1).clamp_min(_LOG_ZERO),
        torch.log_softmax(logits, -1).clamp_min(_LOG_ZERO),
        kind,
    )
    weight = mask.float() * valid.any(-1).float()
    return temperature**2 * _masked_mean(per_row, weight)


def class_soft_loss(
    class_logits: Any,
    teacher_probs: Any,
    mask: Any,
    kind: str = "kl",
    temperature: float = 1.0,
) -> Any:
    """temperature² x the mean over the rows in `mask` [B] of divergence(teacher || student)
    between `teacher_probs` [B, C] (``label_distribution``; each row sums to 1, zeros allowed)
    and a classifier student's `class_logits` [B, C]. Both are softened by the temperature:
    the teacher as probs^(1/T) renormalised (the same as softmax(log probs / T)), the student
    as softmax(logits / T). `kind`: 'kl' or 'jsd' as in ``soft_target_loss``. Computed in
    float32."""
    import torch

    _check(kind, temperature)
    log_q = torch.log(teacher_probs.float()).clamp_min(_LOG_ZERO) / temperature
    per_row = _divergence(
        torch.log_softmax(log_q, -1).clamp_min(_LOG_ZERO),
        torch.log_softmax(class_logits.float() / temperature, -1),
        kind,
    )
    return temperature**2 * _masked_mean(per_row, mask.float())
