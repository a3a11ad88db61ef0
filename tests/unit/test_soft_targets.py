"""Soft targets from the teacher's logprobs, checked against direct loop-based computations."""

from __future__ import annotations

import math
import random

import pytest
import torch

from ray_pipeline.train.soft_targets import (
    class_soft_loss,
    label_distribution,
    soft_target_loss,
    token_alignment,
    top_k_tensors,
)
from ray_pipeline.train.tokenizer import build_tiny_tokenizer

LABELS = ["0", "1"]
LN2 = math.log(2.0)


def pos(token, logprob=0.0, top=None):
    """One answer position as a row's teacher_logprobs holds it."""
    return {"token": token, "logprob": logprob, "top": [[token, logprob]] if top is None else top}


def answer(label_token, top):
    """`{"toxic": <label>}` as the simulator tokenizes it."""
    label_lp = dict(top).get(label_token, -0.1)
    return [pos('{"'), pos("toxic"), pos('":'), pos(" "), pos(label_token, label_lp, top), pos("}")]


# ------------------------------------------------------------------------ label_distribution
def test_label_distribution_renormalises_the_label_alternatives():
    top = [["1", math.log(0.6)], ["0", math.log(0.3)], ["maybe", math.log(0.1)]]
    assert label_distribution(answer("1", top), LABELS) == pytest.approx([1 / 3, 2 / 3])
    # Labels the top-k leaves out get nothing; their order is the task's.
    assert label_distribution(answer("1", top), ["2", "1", "0"]) == pytest.approx([0, 2 / 3, 1 / 3])


def test_only_the_chosen_label_gets_everything():
    assert label_distribution(answer("0", [["0", -0.01], ["zero", -5.0]]), LABELS) == [1.0, 0.0]
    # top_logprobs 0: no alternatives at all, the chosen token still counts.
    assert label_distribution(answer("1", []), LABELS) == [0.0, 1.0]


def test_tokens_are_normalised_like_labels():
    aliases = {"true": "1", "false": "0"}
    top = [[" true", math.log(0.8)], ["False", math.log(0.15)], ["1", math.log(0.05)]]
    # " true" and "1" are both label 1: their mass adds up; "False" is 0.
    got = label_distribution(answer(" true", top), LABELS, aliases)
    assert got == pytest.approx([0.15, 0.85])
    assert label_distribution(answer(" true", top), LABELS) is None  # no aliases: no label


def test_the_first_label_position_is_read_and_none_without_one():
    first = pos("0", math.log(0.9), [["0", math.log(0.9)], ["1", math.log(0.1)]])
    second = pos("1", math.log(0.5), [["1", math.log(0.5)], ["0", math.log(0.5)]])
    assert label_distribution([pos("x"), first, pos(" "), second], LABELS) == pytest.approx(
        [0.9, 0.1]
    )
    assert label_distribution([pos("I"), pos(" cannot"), pos(" say")], LABELS) is None
    assert label_distribution([], LABELS) is None


# --------------------------------------------------------------------------- token_alignment
class WordTokenizer:
    """A tokenizer with one id per known word; anything else is one id per character."""

    eos_token_id, unk_token_id = 0, 1

    def __init__(self, words):
        self.vocab = {w: i for i, w in enumerate(["</s>", "<unk>", *words], start=0)}

    def encode(self, text, add_special_tokens=False):
        if text in self.vocab:
            return [self.vocab[text]]
        return [self.vocab.get(c, self.unk_token_id) for c in text]


def test_alignment_maps_every_position_and_drops_alternatives_that_do_not_map():
    tok = WordTokenizer(["{", "toxic", ":", " ", "1", "0", "}", "t", "o"])
    v = tok.vocab
    teacher = [
        pos("{"),
        pos("toxic", -0.2, [["toxic", -0.2], ["tox", -1.9], ["to", -2.5]]),  # 'to': 2 tokens
        pos(":"),
        pos(" "),
        pos("1", -0.4, [["0", -1.1], ["1", -0.4], ["#", -3.0]]),  # '#': unknown to the student
        pos("}", -0.01, []),  # no alternatives: the chosen one still counts
    ]
    ids = [v["{"], v["toxic"], v[":"], v[" "], v["1"], v["}"], tok.eos_token_id]
    got = token_alignment(tok, teacher, ids)
    assert got == [
        [(v["{"], 0.0)],
        [(v["toxic"], -0.2)],
        [(v[":"], 0.0)],
        [(v[" "], 0.0)],
        [(v["1"], -0.4), (v["0"], -1.1)],
        [(v["}"], -0.01)],
    ]
    ids_t, lps = top_k_tensors(got)
    assert ids_t.shape == lps.shape == (6, 2)
    assert ids_t[4].tolist() == [v["1"], v["0"]] and ids_t[0].tolist() == [v["{"], -1]
    assert lps[4].tolist() == pytest.approx([-0.4, -1.1])
    assert top_k_tensors(got, k=1)[0].shape == (6, 1)


def test_alignment_refuses_what_does_not_map_and_says_which_token():
    tok = WordTokenizer(["a", "b"])
    v = tok.vocab
    with pytest.raises(ValueError, match=r"teacher token 1 'ab' is 2 student tokens"):
        token_alignment(tok, [pos("a"), pos("ab")], [v["a"], v["a"], v["b"]])
    with pytest.raises(ValueError, match=r"teacher token 0 '#' is the student's unknown token"):
        token_alignment(tok, [pos("#")], [1])  # the unknown token is no mapping
    with pytest.raises(ValueError, match=r"teacher token 1 'b' is student token 3, but the"):
        token_alignment(tok, [pos("a"), pos("b")], [v["a"], v["a"]])
    with pytest.raises(ValueError, match=r"teacher token 1 'b' .* has nothing there"):
        token_alignment(tok, [pos("a"), pos("b")], [v["a"]])
    with pytest.raises(ValueError, match=r"ends after 1 tokens, the student's has 2"):
        token_alignment(tok, [pos("a")], [v["a"], v["b"], tok.eos_token_id])


def test_alignment_with_the_tiny_students_tokenizer():
    """The 'tiny' student's byte-level tokenizer without merges: characters align, a teacher's
    multi-character token does not."""
    tok = build_tiny_tokenizer(["ab"], vocab_size=263)
    text = '{"toxic": 1}'
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    chars = [pos(c) for c in text]
    assert [p[0][0] for p in token_alignment(tok, chars, ids)] == ids[:-1]
    words = [pos('{"'), pos("toxic"), pos('":'), pos(" "), pos("1"), pos("}")]
    with pytest.raises(ValueError, match=r"teacher token 0 '\{\"' is 2 student tokens"):
        token_alignment(tok, words, ids)


# -------------------------------------------------------------------------- soft_target_loss
def reference_divergence(q: list[float], p: list[float], kind: str) -> float:
    if kind == "kl":
        return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True) if qi > 0)
    m = [(qi + pi) / 2 for qi, pi in zip(q, p, strict=True)]
    return 0.5 * reference_divergence(q, m, "kl") + 0.5 * reference_divergence(p, m, "kl")


def softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [x / sum(e) for x in e]


def reference_soft_target_loss(logits, ids, logprobs, mask, kind, t):
    """The loss row by row with python floats: the teacher's top-k renormalised, the student
    restricted to the same ids and renormalised, both at temperature t."""
    total, rows = 0.0, 0
    for r in range(len(logits)):
        keep = [j for j, i in enumerate(ids[r]) if i >= 0]
        if not mask[r] or not keep:
            continue
        q = softmax([logprobs[r][j] / t for j in keep])
        p = softmax([logits[r][ids[r][j]] / t for j in keep])
        total += reference_divergence(q, p, kind)
        rows += 1
    return t * t * total / max(rows, 1)


def random_case(seed, n=7, v=13, k=4):
    rng = random.Random(seed)
    logits = [[rng.gauss(0, 2) for _ in range(v)] for _ in range(n)]
    ids, lps = [], []
    for _ in range(n):
        width = rng.randint(0, k)  # some rows padded, one maybe empty
        chosen = rng.sample(range(v), width)
        raw = sorted((math.log(rng.random() + 1e-3) for _ in chosen), reverse=True)
        ids.append(chosen + [-1] * (k - width))
        lps.append(raw + [0.0] * (k - width))
    mask = [rng.random() < 0.8 for _ in range(n)]
    return logits, ids, lps, mask


@pytest.mark.parametrize("kind", ["kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_target_loss_equals_the_direct_computation(kind, temperature, seed):
    logits, ids, lps, mask = random_case(seed)
    got = soft_target_loss(
        torch.tensor(logits),
        torch.tensor(ids),
        torch.tensor(lps),
        torch.tensor(mask),
        kind=kind,
        temperature=temperature,
    )
    want = reference_soft_target_loss(logits, ids, lps, mask, kind, temperature)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_zero_when_the_student_agrees_on_the_top_k_positive_otherwise(kind):
    logits, ids, lps, mask = random_case(3)
    student = torch.tensor(logits)
    ids_t, lps_t, mask_t = torch.tensor(ids), torch.tensor(lps), torch.ones(len(ids), dtype=bool)
    agree = student.clone()
    for r, row in enumerate(ids):
        for j, i in enumerate(row):
            if i >= 0:
                agree[r, i] = lps[r][j] + 5.0  # any shift: the same distribution on the top-k
    for t in (1.0, 3.0):
        assert soft_target_loss(agree, ids_t, lps_t, mask_t, kind, t).item() == pytest.approx(
            0.0, abs=1e-6
        )
    assert soft_target_loss(student, ids_t, lps_t, mask_t, kind).item() > 1e-3


@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_gradients_reach_the_target_logits_only(kind):
    logits, ids, lps, mask = random_case(4)
    student = torch.tensor(logits, requires_grad=True)
    loss = soft_target_loss(student, torch.tensor(ids), torch.tensor(lps), torch.tensor(mask), kind)
    loss.backward()
    grad = student.grad
    assert torch.isfinite(grad).all()
    for r, row in enumerate(ids):
        targets = {i for i in row if i >= 0}
        for i in range(len(logits[r])):
            if mask[r] and len(targets) > 1 and i in targets:
                assert grad[r, i] != 0
            if not mask[r] or i not in targets:
                assert grad[r, i] == 0


def test_jsd_is_symmetric_and_at_most_ln2():
    teacher = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)]])
    student = torch.tensor([[0.3, -1.0, 2.0, 9.0]])  # id 3 is outside the top-k
    ids, mask = torch.tensor([[0, 1, 2]]), torch.tensor([True])
    forward = soft_target_loss(student, ids, teacher, mask, "jsd")
    student_lp = torch.log_softmax(student[:, :3], -1)
    backward = soft_target_loss(teacher, ids, student_lp, mask, "jsd")
    assert forward.item() == pytest.approx(backward.item(), rel=1e-6)
    # Disjoint beliefs: as far apart as two distributions get.
    apart = soft_target_loss(
        torch.tensor([[-60.0, 60.0]]), torch.tensor([[0, 1]]), torch.tensor([[0.0, -60.0]]), mask
    )
    assert apart.item() > 100  # KL has no bound
    jsd = soft_target_loss(
        torch.tensor([[-60.0, 60.0]]),
        torch.tensor([[0, 1]]),
        torch.tensor([[0.0, -60.0]]),
        mask,
        "jsd",
    )
    assert jsd.item() == pytest.approx(LN2, rel=1e-6) and jsd.item() <= LN2 + 1e-7


def test_rows_without_targets_or_out_of_the_mask_add_nothing():
    student = torch.zeros(2, 5, requires_grad=True)
    ids = torch.tensor([[-1, -1], [-1, -1]])
    loss = soft_target_loss(student, ids, torch.zeros(2, 2), torch.tensor([True, False]), "jsd")
    loss.backward()
    assert loss.item() == 0.0 and (student.grad == 0).all()


def test_bad_kind_or_temperature_is_refused():
    args = (torch.zeros(1, 3), torch.tensor([[0]]), torch.zeros(1, 1), torch.tensor([True]))
    with pytest.raises(ValueError, match=r"kind must be one of \('kl', 'jsd'\), got 'ce'"):
        soft_target_loss(*args, kind="ce")
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        soft_target_loss(*args, temperature=0)
    with pytest.raises(ValueError, match="kind must be one of"):
        class_soft_loss(torch.zeros(1, 2), torch.tensor([[0.5, 0.5]]), torch.tensor([1]), "x")


# --------------------------------------------------------------------------- class_soft_loss
def reference_class_loss(logits, probs, mask, kind, t):
    total, rows = 0.0, 0
    for r in range(len(logits)):
        if not mask[r]:
            continue
        soft = [pr ** (1 / t) for pr in probs[r]]
        q = [x / sum(soft) for x in soft]
        p = softmax([z / t for z in logits[r]])
        total += reference_divergence(q, p, kind)
        rows += 1
    return t * t * total / max(rows, 1)


@pytest.mark.parametrize("kind", ["kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_class_soft_loss_equals_the_direct_computation(kind, temperature):
    rng = random.Random(5)
    logits = [[rng.gauss(0, 2) for _ in range(3)] for _ in range(6)]
    probs = []
    for r in range(6):
        raw = [rng.random() for _ in range(3)]
        if r % 3 == 0:
            raw[r % 3] = 0.0  # a class the teacher gives nothing
        probs.append([x / sum(raw) for x in raw])
    mask = [1, 1, 0, 1, 1, 1]
    got = class_soft_loss(
        torch.tensor(logits), torch.tensor(probs), torch.tensor(mask), kind, temperature
    )
    want = reference_class_loss(logits, probs, mask, kind, temperature)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_class_soft_loss_zero_on_agreement_symmetric_jsd_and_gradients(kind):
    probs = torch.tensor([[0.9, 0.1], [0.25, 0.75], [1.0, 0.0]])
    mask = torch.tensor([True, True, False])
    agree = torch.log(probs.clamp_min(1e-12)) + 3.0
    assert class_soft_loss(agree, probs, mask, kind, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [5.0, 0.0]], requires_grad=True)
    loss = class_soft_loss(logits, probs, torch.ones(3, dtype=bool), kind)
    assert loss.item() > 0.1
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad.abs().sum(-1) > 0).all()
    if kind == "jsd":
        q = torch.tensor([[0.9, 0.1]])
        p = torch.softmax(torch.tensor([[0.0, 2.0]]), -1)
        one = class_soft_loss(torch.log(p), q, torch.tensor([True]), "jsd")
        other = class_soft_loss(torch.log(q), p, torch.tensor([True]), "jsd")
        assert one.item() == pytest.approx(other.item(), rel=1e-6)
        far = class_soft_loss(
            torch.tensor([[-50.0, 50.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([True]), "jsd"
        )
        assert far.item() == pytest.approx(LN2, rel=1e-6) and far.item() <= LN2 + 1e-7
