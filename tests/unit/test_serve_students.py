"""Students as the Serve deployment holds them (``serve_apps.student.StudentGroup``), without
Ray: two LoRA students on one tiny base share one model and answer exactly as each loaded
alone; a classifier student; the context check; usage counted with the student's tokenizer."""

from __future__ import annotations

import json

import pytest

from ray_pipeline.config import LoraSection, TinyModelSection
from ray_pipeline.data import synthetic
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.train.checkpoint import gathered_state_dict, save_checkpoint
from ray_pipeline.train.data import Example, encode_classifier_examples, encode_examples, pad_batch
from ray_pipeline.train.model import CLASSIFIER, apply_lora, build_tiny_model
from ray_pipeline.train.student import Student
from ray_pipeline.train.tokenizer import build_tiny_tokenizer, tokenizer_corpus
from serve_apps.student import ContextTooLong, StudentGroup, load_students, student_groups

torch = pytest.importorskip("torch")

PROMPT = Prompt(synthetic.PROMPT)
TEXTS = synthetic.generate_comments(48, seed=5)
EXAMPLES = [
    Example(
        id=str(i),
        messages=PROMPT.messages(t),
        target=json.dumps({"toxic": int(synthetic.true_label(t))}),
        label=synthetic.true_label(t),
        input=t,
    )
    for i, t in enumerate(TEXTS)
]
TINY = TinyModelSection(
    hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=128
)
META = {
    "base_model": "tiny",
    "label_key": "toxic",
    "labels": ["0", "1"],
    "prompt": {"template": synthetic.PROMPT, "placeholder": "{input}", "system": None},
}


def _train(model, batch, steps: int, seed: int):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two LoRA causal-LM students on one tiny base (trained differently), and a full
    classifier student."""
    tmp = tmp_path_factory.mktemp("students")
    tok = build_tiny_tokenizer(tokenizer_corpus(EXAMPLES), vocab_size=400)
    base = build_tiny_model(tok, TINY, seed=1)
    base.save_pretrained(tmp / "base")
    enc = encode_examples(tok, EXAMPLES, max_seq_len=96)
    batch = pad_batch([e["input_ids"] for e in enc], [e["labels"] for e in enc], tok.pad_token_id)
    out = {}
    lora = LoraSection(r=4, alpha=8, modules_to_save=["lm_head", "embed_tokens"])
    for name, steps in (("a", 4), ("b", 25)):
        model = _train(apply_lora(build_tiny_model(tok, TINY, seed=1), lora), batch, steps, 0)
        state = gathered_state_dict(model, trainable_only=True, zero3=False, writer=True)
        out[name] = str(
            save_checkpoint(
                tmp / name,
                model=model,
                state_dict=state,
                tokenizer=tok,
                method="lora",
                meta={**META, "kind": "causal_lm", "pad_id": tok.pad_token_id},
                base_dir=tmp / "base",
            )
        )
    clf = build_tiny_model(tok, TINY, seed=2, kind=CLASSIFIER, labels=["0", "1"])
    enc, _ = encode_classifier_examples(tok, EXAMPLES, 96, ["0", "1"])
    batch = pad_batch([e["input_ids"] for e in enc], [e["labels"] for e in enc], tok.pad_token_id)
    clf = _train(clf, batch, 10, 0)
    out["clf"] = str(
        save_checkpoint(
            tmp / "clf",
            model=clf,
            state_dict=clf.state_dict(),
            tokenizer=tok,
            method="full",
            meta={**META, "kind": CLASSIFIER, "pad_id": tok.pad_token_id},
        )
    )
    return out


def test_adapters_on_one_base_are_one_group_and_share_one_model(checkpoints):
    groups = student_groups(
        {"a": checkpoints["a"], "clf": checkpoints["clf"], "b": checkpoints["b"]}
    )
    assert groups == [
        {"a": checkpoints["a"], "b": checkpoints["b"]},
        {"clf": checkpoints["clf"]},
    ]
    students = load_students({"a": checkpoints["a"], "b": checkpoints["b"]}, "cpu")
    assert students["a"].model is students["b"].model  # the base is loaded once
    assert set(students["a"].model.peft_config) == {"a", "b"}


def test_each_adapter_answers_as_its_checkpoint_alone(checkpoints):
    group = StudentGroup(load_students({"a": checkpoints["a"], "b": checkpoints["b"]}, "cpu"))
    prompts = [PROMPT.messages(t) for t in TEXTS[:6]]
    # Requests of both students in one batch, interleaved.
    items = [(name, m, 12) for m in prompts for name in ("a", "b")]
    replies = group.answer(items)
    for name in ("a", "b"):
        alone = Student.load(checkpoints[name], device="cpu").answer(prompts, max_new_tokens=12)
        mine = [r for (n, _, _), r in zip(items, replies, strict=True) if n == name]
        assert [r.text for r in mine] == [a.text for a in alone], name
        assert [r.confidence for r in mine] == pytest.approx(
            [a.confidence for a in alone], abs=1e-4
        )
    # Trained apart, they are sure to different degrees: each request got its own adapter.
    assert all(
        abs(a.confidence - b.confidence) > 1e-3
        for a, b in zip(replies[0::2], replies[1::2], strict=True)
    )


def test_usage_and_finish_reason_count_the_students_tokens(checkpoints):
    ((name, student),) = load_students({"a": checkpoints["a"]}, "cpu").items()
    group = StudentGroup({name: student})
    messages = PROMPT.messages(TEXTS[0])
    tok = student.tokenizer
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert group.prompt_tokens(name, messages, 8) == len(
        tok(rendered, add_special_tokens=False)["input_ids"]
    )
    reply = group.answer([(name, messages, 3)])[0]
    assert reply.completion_tokens == len(tok(reply.text, add_special_tokens=False)["input_ids"])
    assert (reply.completion_tokens, reply.finish_reason) == (3, "length")  # cut at max_tokens


def test_a_prompt_longer_than_the_student_takes_is_refused(checkpoints):
    group = StudentGroup(
        {
            **load_students({"a": checkpoints["a"]}, "cpu"),
            **load_students({"clf": checkpoints["clf"]}, "cpu"),
        }
    )
    long = PROMPT.messages("word " * 400)
    with pytest.raises(ContextTooLong, match="maximum context length is 128 tokens"):
        group.prompt_tokens("a", long, 8)
    fits = PROMPT.messages("short")
    n = group.prompt_tokens("a", fits, 8)
    with pytest.raises(ContextTooLong, match="lower max_tokens"):
        group.prompt_tokens("a", fits, 129 - n)
    with pytest.raises(ContextTooLong, match="the input is"):
        group.prompt_tokens("clf", long, 8)


def test_a_classifier_student_answers_with_every_class_probability(checkpoints):
    group = StudentGroup(load_students({"clf": checkpoints["clf"]}, "cpu"))
    replies = group.answer([("clf", PROMPT.messages(t), 8) for t in TEXTS[:4]])
    for r in replies:
        assert json.loads(r.text)["toxic"] in (0, 1) and r.finish_reason == "stop"
        assert set(r.probs) == {"0", "1"} and sum(r.probs.values()) == pytest.approx(1.0)
        assert r.confidence == pytest.approx(r.probs[str(json.loads(r.text)["toxic"])])
    # The classifier reads the input inside the task's prompt, not the template around it.
    assert group.prompt_tokens("clf", PROMPT.messages("hi"), 8) < 10
