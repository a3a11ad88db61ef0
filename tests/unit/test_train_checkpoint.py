"""Checkpoint save + Student.load round trips (LoRA and full) of a trained tiny model, and
the ZeRO-3 gather that keeps saved weights from being empty shards. No Ray."""

from __future__ import annotations

import json
import socket

import pytest

from ray_pipeline.config import LoraSection, TinyModelSection
from ray_pipeline.train.checkpoint import META_FILE, gathered_state_dict, read_meta, save_checkpoint
from ray_pipeline.train.data import Example, encode_examples, pad_batch
from ray_pipeline.train.model import apply_lora, build_tiny_model
from ray_pipeline.train.student import Student
from ray_pipeline.train.tokenizer import build_tiny_tokenizer, tokenizer_corpus

torch = pytest.importorskip("torch")

EXAMPLES = [
    Example(
        id=str(i),
        messages=[{"role": "user", "content": f"comment {w} number {i}"}],
        target=f'{{"toxic": {int(w == "idiot")}}}',
    )
    for i, w in enumerate(["idiot", "fine", "nice", "idiot", "good", "idiot"] * 4)
]
PROMPTS = [
    [{"role": "user", "content": "comment idiot number 3"}],
    [{"role": "user", "content": "a longer comment that is fine number 99"}],
]
TINY = TinyModelSection(
    hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(tokenizer_corpus(EXAMPLES), vocab_size=300)


def _train_a_little(model, tokenizer, steps: int = 15):
    """Enough steps to move every trainable weight far from its initial value."""
    torch.manual_seed(0)
    enc = encode_examples(tokenizer, EXAMPLES, max_seq_len=48)
    batch = pad_batch(
        [e["input_ids"] for e in enc], [e["labels"] for e in enc], tokenizer.pad_token_id
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _reference_answers(model, tokenizer) -> list[str]:
    """What the in-memory model answers, through the same Student code path."""
    return Student(model, tokenizer, {}, "cpu").complete(PROMPTS, max_new_tokens=8)


def _save(model, tokenizer, tmp_path, method: str, base_dir=None):
    state = gathered_state_dict(model, trainable_only=method == "lora", zero3=False, writer=True)
    meta = {
        "base_model": "tiny",
        "manifest": "m.json",
        "dataset_content_sha256": "abc",
        "label_key": "toxic",
        "train": {"method": method},
        "metrics": {"train_loss": 0.5},
    }
    return save_checkpoint(
        tmp_path / "ckpt",
        model=model,
        state_dict=state,
        tokenizer=tokenizer,
        method=method,
        meta=meta,
        base_dir=base_dir,
    )


def test_full_roundtrip_identical(tokenizer, tmp_path):
    model = _train_a_little(build_tiny_model(tokenizer, TINY, seed=1), tokenizer)
    expected = _reference_answers(model, tokenizer)
    ckpt = _save(model, tokenizer, tmp_path, "full")
    assert {p.name for p in ckpt.iterdir()} == {META_FILE, "model", "tokenizer"}
    student = Student.load(ckpt, device="cpu")
    assert student.meta["method"] == "full" and student.meta["base_model"] == "tiny"
    assert student.meta["metrics"] == {"train_loss": 0.5}
    assert student.complete(PROMPTS, max_new_tokens=8) == expected
    for name, p in model.state_dict().items():
        assert torch.equal(p, student.model.state_dict()[name]), name


def test_lora_roundtrip_identical(tokenizer, tmp_path):
    base = build_tiny_model(tokenizer, TINY, seed=2)
    base.save_pretrained(tmp_path / "base")  # the random base, as the train stage keeps it
    lora = LoraSection(r=4, alpha=8, modules_to_save=["lm_head", "embed_tokens"])
    model = _train_a_little(apply_lora(base, lora), tokenizer)
    trained_head = model.base_model.model.lm_head.modules_to_save["default"].weight.detach().clone()
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n).detach().clone()
    assert lora_b.abs().sum() > 0  # adapters really trained (they start at zero)
    expected = _reference_answers(model, tokenizer)
    ckpt = _save(model, tokenizer, tmp_path, "lora", base_dir=tmp_path / "base")
    assert {p.name for p in ckpt.iterdir()} == {META_FILE, "adapter", "base", "tokenizer"}

    unmerged = Student.load(ckpt, device="cpu", merge=False)
    assert unmerged.complete(PROMPTS, max_new_tokens=8) == expected
    assert torch.equal(
        unmerged.model.base_model.model.lm_head.modules_to_save["default"].weight, trained_head
    )
    merged = Student.load(ckpt, device="cpu")
    assert merged.complete(PROMPTS, max_new_tokens=8) == expected
    assert not hasattr(merged.model, "peft_config")  # merged into a plain model


def test_meta_is_self_describing(tokenizer, tmp_path):
    model = build_tiny_model(tokenizer, TINY, seed=3)
    ckpt = _save(model, tokenizer, tmp_path, "full")
    meta = json.loads((ckpt / META_FILE).read_text())
    assert meta == read_meta(ckpt)
    for key in (
        "base_model",
        "method",
        "manifest",
        "dataset_content_sha256",
        "label_key",
        "train",
        "metrics",
    ):
        assert key in meta, key
    with pytest.raises(FileNotFoundError, match="not a student checkpoint"):
        read_meta(tmp_path)


def test_student_truncates_long_prompts_from_the_left(tokenizer):
    model = build_tiny_model(tokenizer, TINY, seed=4).eval()
    student = Student(model, tokenizer, {}, "cpu")
    long = [{"role": "user", "content": "comment fine number 1 " * 40}]
    ids = student._encode_prompts([long], max_new_tokens=8)[0]
    assert len(ids) == TINY.max_position_embeddings - 8
    full = tokenizer(
        student.tokenizer.apply_chat_template(long, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )["input_ids"]
    assert ids == full[-len(ids) :]  # the end (with the generation prompt) is kept
    assert len(student.complete([long, PROMPTS[0]], max_new_tokens=8)) == 2
    with pytest.raises(ValueError, match="leaves no room"):
        student.complete(PROMPTS, max_new_tokens=64)


def test_batched_left_padded_generation_matches_one_by_one(tokenizer):
    model = _train_a_little(build_tiny_model(tokenizer, TINY, seed=5), tokenizer)
    student = Student(model, tokenizer, {}, "cpu")
    together = student.complete(PROMPTS, max_new_tokens=8)
    alone = [student.complete([p], max_new_tokens=8)[0] for p in PROMPTS]
    assert together == alone
    assert together[0] == '{"toxic": 1}'  # learned the toy rule on a training prompt
    answers = student.answer(PROMPTS, max_new_tokens=8)
    assert [a.text for a in answers] == together
    assert all(0 < a.confidence <= 1 and a.probs is None for a in answers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zero3_weights_are_gathered_before_saving(tokenizer, tmp_path, monkeypatch):
    """Under ZeRO-3 every weight is a placeholder outside a gather: saving state_dict() would
    write empty tensors. gathered_state_dict must return the full trained weights."""
    import importlib

    import torch.distributed as dist

    for k, v in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "DS_ACCELERATOR": "cpu",
    }.items():
        monkeypatch.setenv(k, v)
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no g++ build
    from ray_pipeline.config import TrainSection
    from ray_pipeline.train.deepspeed_config import build_deepspeed_config

    dist.init_process_group("gloo")
    try:
        model = build_tiny_model(tokenizer, TINY, seed=6)
        expected = {n: p.detach().clone() for n, p in model.named_parameters()}
        train = TrainSection.model_validate({"batch_size": 2, "deepspeed": {"zero_stage": 3}})
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=torch.optim.AdamW(model.parameters(), lr=0.0),
            config=build_deepspeed_config(train, world_size=1),
        )
        assert all(p.numel() == 0 for p in engine.module.parameters())  # the pitfall is real
        state = gathered_state_dict(engine.module, trainable_only=False, zero3=True, writer=True)
        for name, value in expected.items():
            assert torch.equal(state[name], value), name
        ckpt = save_checkpoint(
            tmp_path / "z3",
            model=engine.module,
            state_dict=state,
            tokenizer=tokenizer,
            method="full",
            meta={"base_model": "tiny"},
        )
        reloaded = Student.load(ckpt, device="cpu").model
        for name, value in expected.items():
            assert torch.equal(reloaded.state_dict()[name], value), name
    finally:
        dist.destroy_process_group()


def test_lora_on_a_pretrained_base_references_it(tokenizer, tmp_path):
    """A hub (or local) base is not copied: the adapter is loaded onto meta['base_model']."""
    pretrained = tmp_path / "pretrained"
    build_tiny_model(tokenizer, TINY, seed=7).save_pretrained(pretrained)
    from transformers import AutoModelForCausalLM

    lora = LoraSection(r=4, alpha=8, modules_to_save=["lm_head"])
    model = _train_a_little(
        apply_lora(AutoModelForCausalLM.from_pretrained(pretrained), lora), tokenizer
    )
    expected = _reference_answers(model, tokenizer)
    state = gathered_state_dict(model, trainable_only=True, zero3=False, writer=True)
    assert state and all(("lora_" in n or "modules_to_save" in n) for n in state)
    ckpt = save_checkpoint(
        tmp_path / "ckpt",
        model=model,
        state_dict=state,
        tokenizer=tokenizer,
        method="lora",
        meta={"base_model": str(pretrained)},
    )
    assert {p.name for p in ckpt.iterdir()} == {META_FILE, "adapter", "tokenizer"}
    assert Student.load(ckpt, device="cpu").complete(PROMPTS, max_new_tokens=8) == expected


# ---------------------------------------------------------------- classifier students
LABELS = ["0", "1"]
CLASSIFIER_EXAMPLES = [
    Example(
        id=str(i),
        messages=[{"role": "user", "content": f"Is it toxic? {w} said number {i}"}],
        target="",
        label=str(int(w == "idiot")),
        input=f"{w} said number {i}",
    )
    for i, w in enumerate(["idiot", "fine", "nice", "idiot", "good", "idiot"] * 4)
]
CLASSIFIER_META = {
    "kind": "classifier",
    "labels": LABELS,
    "label_key": "toxic",
    "prompt": {"template": "Is it toxic? {input}", "placeholder": "{input}", "system": None},
}


def _train_classifier(model, tokenizer, steps: int = 25):
    from ray_pipeline.train.data import encode_classifier_examples

    torch.manual_seed(0)
    enc, cut = encode_classifier_examples(tokenizer, CLASSIFIER_EXAMPLES, 48, LABELS)
    assert cut == 0 and {e["labels"] for e in enc} == {0, 1}
    batch = pad_batch(
        [e["input_ids"] for e in enc], [e["labels"] for e in enc], tokenizer.pad_token_id
    )
    assert batch["labels"].shape == (len(enc),)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_classifier_student_round_trip_answers_with_label_probabilities(
    tokenizer, tmp_path, method
):
    model = build_tiny_model(tokenizer, TINY, seed=3, kind="classifier", labels=LABELS)
    base = tmp_path / "base"
    model.save_pretrained(base)
    if method == "lora":
        model = apply_lora(model, LoraSection(r=4, alpha=8), kind="classifier")
        # The new head is trained fully beside the adapters.
        assert any("score" in n and p.requires_grad for n, p in model.named_parameters())
    model = _train_classifier(model, tokenizer)
    state = gathered_state_dict(model, trainable_only=method == "lora", zero3=False, writer=True)
    ckpt = save_checkpoint(
        tmp_path / "ckpt",
        model=model,
        state_dict=state,
        tokenizer=tokenizer,
        method=method,
        meta={**CLASSIFIER_META, "base_model": "tiny"},
        base_dir=base if method == "lora" else None,
    )
    student = Student.load(ckpt)
    messages = [
        [{"role": "user", "content": "Is it toxic? idiot said number 3"}],
        [{"role": "user", "content": "Is it toxic? fine said number 99"}],
    ]
    answers = student.answer(messages)
    assert [json.loads(a.text) for a in answers] == [{"toxic": 1}, {"toxic": 0}]
    for a in answers:
        assert set(a.probs) == set(LABELS) and abs(sum(a.probs.values()) - 1) < 1e-5
        assert a.confidence == max(a.probs.values()) > 0.5
    # The input is what the prompt's slot held: the same answer from the bare text.
    assert student.input_text(messages[0]) == "idiot said number 3"
    # A stored threshold moves the decision: above every probability, nothing is positive.
    student.meta["threshold"] = {"positive_label": "1", "value": 1.01}
    assert [json.loads(a.text) for a in student.answer(messages)] == [{"toxic": 0}] * 2


def test_classifier_inputs_longer_than_max_seq_len_are_cut_and_counted(tokenizer):
    from ray_pipeline.train.data import encode_classifier_examples

    long = Example(id="x", messages=[], target="", label="1", input="idiot " * 100)
    enc, cut = encode_classifier_examples(tokenizer, [long, *CLASSIFIER_EXAMPLES[:2]], 16, LABELS)
    assert cut == 1 and len(enc[0]["input_ids"]) == 16 and enc[0]["labels"] == 1
    with pytest.raises(ValueError, match="label outside the task's labels"):
        encode_classifier_examples(
            tokenizer, [Example(id="y", messages=[], target="", label="2", input="a")], 16, LABELS
        )
