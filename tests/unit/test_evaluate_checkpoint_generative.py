"""`distill evaluate CHECKPOINT --data FILE ...` on a generative task's checkpoint, with no run
folder: a tiny causal LM taught the short-Q&A format answers questions it never saw, and its
answers are scored against reference answers chosen to give known exact match and ROUGE-L
(some equal to what it says, one with a word more, the rest with no word in common), with the
LLM judge of a run config (the simulator's word-overlap judge) or without it; bad files and
checkpoints get clear errors before any model is loaded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv
import pytest
import yaml

from ray_pipeline.config import TinyModelSection
from ray_pipeline.data import qa
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.evaluate.checkpoint import checkpoint_task, evaluate_checkpoint, referenced_texts
from ray_pipeline.teacher.simulator import overlap_judgement
from ray_pipeline.train.checkpoint import save_checkpoint, update_meta
from ray_pipeline.train.data import Example, encode_examples, pad_batch
from ray_pipeline.train.model import CAUSAL_LM, build_tiny_model
from ray_pipeline.train.student import Student
from ray_pipeline.train.tokenizer import build_tiny_tokenizer, tokenizer_corpus

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]
PROMPT = Prompt(qa.PROMPT)
TRAIN_QUESTIONS = qa.generate_questions(24, seed=3)
UNSEEN = qa.generate_questions(8, seed=11, exclude=set(TRAIN_QUESTIONS))
NEVER_SAID = "zzzq"  # a word the student never writes: no overlap with any answer
# Everything a train stage of a generative task records that evaluation reads.
META = {
    "base_model": "tiny",
    "kind": CAUSAL_LM,
    "task": "short-qa",
    "task_kind": "generative",
    "labels": None,
    "label_key": "label",
    "output_schema": qa.OUTPUT_SCHEMA,
    "prompt": {"template": qa.PROMPT, "placeholder": "{input}", "system": None},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny causal LM trained 30 steps on 24 questions and their JSON answers: it answers in
    the task's format (not always rightly)."""
    examples = [
        Example(str(i), PROMPT.messages(q), json.dumps({"answer": qa.true_answer(q)}), None, q)
        for i, q in enumerate(TRAIN_QUESTIONS)
    ]
    tok = build_tiny_tokenizer(tokenizer_corpus(examples), vocab_size=400)
    tiny = TinyModelSection(
        hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=160
    )
    model = build_tiny_model(tok, tiny, seed=2)
    enc = encode_examples(tok, examples, 128)
    batch = pad_batch([e["input_ids"] for e in enc], [e["labels"] for e in enc], tok.pad_token_id)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    # One thread: a model this small trains ~8x slower when its threads fight other
    # processes for 2 shared cores (measured: 20 s against 2.5 s at a load average of 9).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(30):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("gen") / "student"
    save_checkpoint(
        path,
        model=model.eval(),
        state_dict=model.state_dict(),
        tokenizer=tok,
        method="full",
        meta={**META, "pad_id": tok.pad_token_id},
    )
    return str(path)


@pytest.fixture(scope="module")
def answers(checkpoint) -> list[str]:
    """What the student says to the unseen questions (greedy, as evaluation asks it)."""
    student = Student.load(checkpoint, device="cpu")
    texts = [a.text for a in student.answer([PROMPT.messages(q) for q in UNSEEN], 32)]
    for t in texts:  # the precondition of the known values below: every answer in format
        assert json.loads(t).keys() == {"answer"} and NEVER_SAID not in t, t
    return texts


def _words(answer: str) -> int:
    # ROUGE-L's tokens (rouge-score: lower-cased runs of letters and digits) of the value.
    return len(re.findall(r"[a-z0-9]+", json.loads(answer)["answer"].lower()))


def _references(answers: list[str]) -> list[dict]:
    """Rows 0-3: the student's own answer; row 4: its answer and one word more; rows 5-7: a
    word it never says."""
    said = [json.loads(a)["answer"] for a in answers]
    return [
        *({"answer": s} for s in said[:4]),
        {"answer": f"{said[4]} {NEVER_SAID}"},
        *({"answer": NEVER_SAID} for _ in said[5:]),
    ]


def _write(tmp_path: Path, refs: list) -> tuple[Path, Path]:
    jsonl = tmp_path / "unseen.jsonl"
    with open(jsonl, "w") as f:
        for q, r in zip(UNSEEN, refs, strict=True):
            f.write(json.dumps({"question": q, "reference": r}) + "\n")
    csv = tmp_path / "unseen.csv"  # a JSON reference as its text, as a CSV holds it
    pyarrow.csv.write_csv(
        pa.table({"question": UNSEEN, "reference": [json.dumps(r) for r in refs]}), csv
    )
    return jsonl, csv


def _judge_config(tmp_path: Path) -> Path:
    """A run config whose LLM judge is the simulator's word-overlap judge (scale 1-5)."""
    path = tmp_path / "judge.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "task": {
                    "kind": "generative",
                    "prompt": {"template": qa.PROMPT},
                    "output_schema": qa.OUTPUT_SCHEMA,
                },
                "teacher": {"model": "sim", "simulator": {"enabled": True, "rule": "qa"}},
                "data": {"seeds": {"path": "configs/data/qa_seeds/seeds.jsonl"}},
                "evaluate": {"judge": {"enabled": True}},
            }
        )
    )
    return path


def test_generative_json_on_an_unseen_file(checkpoint, answers, tmp_path):
    refs = _references(answers)
    jsonl, csv = _write(tmp_path, refs)
    cmd = [
        sys.executable, "-m", "ray_pipeline.cli", "evaluate", checkpoint, "--data", str(jsonl),
        "--text-column", "question", "--label-column", "reference", "--json",
        "--judge", str(_judge_config(tmp_path)),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert proc.stdout.count("\n") == 1
    n = _words(answers[4])
    assert result["rows"] == 8 and result["unparsed"] == 0
    assert result["exact_match"] == 4 / 8
    # ROUGE-L F1 of the row with a word more: precision 1, recall n/(n+1).
    assert result["rouge_l"] == pytest.approx((4 + 2 * n / (2 * n + 1)) / 8)
    assert result["json_adherence"] == 1.0
    # The judge: the simulator's overlap rule on each (reference, answer), as sent.
    expected = [
        json.loads(overlap_judgement(json.dumps(r), a, 1, 5))["score"]
        for r, a in zip(refs, answers, strict=True)
    ]
    assert expected[:4] == [5] * 4 and expected[5:] == [1] * 3
    assert result["judge_score"] == pytest.approx(sum(expected) / 8)
    assert result["judge_failed"] == 0
    judge = result["judge"]
    assert judge["run"] and judge["simulator"] and judge["model"] == "sim"
    assert judge["scale"] == [1, 5] and judge["judged"] == 8 and judge["failed"] == 0
    assert result["task"] == "short-qa" and result["task_kind"] == "generative"
    assert result["output_schema"] == qa.OUTPUT_SCHEMA and result["kind"] == CAUSAL_LM
    assert result["reference_column"] == "reference" and result["text_column"] == "question"
    assert result["checkpoint"] == str(Path(checkpoint).absolute())
    assert result["data"] == str(jsonl.absolute())
    assert "accuracy" not in result  # a label task's metric: not made up here

    # The same references in a CSV (JSON as text), without the judge: the same scores, and
    # the output says the judge was not run.
    again = evaluate_checkpoint(checkpoint, csv, "question", "reference")
    assert {k: again[k] for k in ("exact_match", "rouge_l", "json_adherence", "unparsed")} == {
        k: result[k] for k in ("exact_match", "rouge_l", "json_adherence", "unparsed")
    }
    assert again["judge_score"] is None and again["judge_failed"] is None
    assert again["judge"] == {
        "run": False,
        "reason": "no --judge CONFIG given: the LLM judge needs a teacher",
    }


def test_free_text_checkpoint_compares_the_text(checkpoint, answers, tmp_path):
    """Without an output schema an answer is its text: a reference equal to what the student
    writes (here the JSON text itself) is exact, another is not, adherence is not scored."""
    free = tmp_path / "free"
    shutil.copytree(checkpoint, free)
    update_meta(free, output_schema=None)
    refs = [*answers[:2], "Berlin", "the moon"]
    data = tmp_path / "free.jsonl"
    with open(data, "w") as f:
        for q, r in zip(UNSEEN[:4], refs, strict=True):
            f.write(json.dumps({"q": q, "ref": r}) + "\n")
    result = evaluate_checkpoint(free, data, "q", "ref")
    assert result["rows"] == 4 and result["exact_match"] == 0.5
    assert result["json_adherence"] is None and result["output_schema"] is None


def test_generative_errors_name_what_and_where(tmp_path):
    from typer.testing import CliRunner

    from ray_pipeline.cli import app

    # Every error comes before any model is loaded: the checkpoint's metadata is enough.
    checkpoint = tmp_path / "student"
    checkpoint.mkdir()
    (checkpoint / "distill_checkpoint.json").write_text(json.dumps(META))

    def fails(lines: list[dict], text: str, ref: str, match: str, **kw) -> None:
        path = tmp_path / "bad.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        with pytest.raises(ValueError, match=match):
            evaluate_checkpoint(checkpoint, path, text, ref, **kw)

    ok = {"q": "What is 2 plus 2?", "ref": {"answer": "4"}}
    fails([ok, {"q": "x"}], "q", "ref", r"bad.jsonl: record 2 has no column\(s\) \['ref'\]")
    fails([ok], "question", "ref", r"record 1 has no column\(s\) \['question'\]")
    fails([ok, {"q": "  ", "ref": "4"}], "q", "ref", r"record 2 has no text in column 'q'")
    fails([{"q": "a?", "ref": ""}], "q", "ref", r"record 1 has no reference answer in column")
    fails([], "q", "ref", r"no records to evaluate on")
    # A label file (Jigsaw-like 0/1) given to a generative checkpoint.
    fails(
        [{"q": "you are kind", "ref": 0}],
        "q",
        "ref",
        r"record 1: reference '0' in column 'ref' does not satisfy the output schema of task "
        r"'short-qa' \(0 is not of type 'object'\); is this a file of that task's answers\?",
    )
    fails(
        [ok, {"q": "a?", "ref": "Paris"}],
        "q",
        "ref",
        r"record 2: .*\('Paris' is not of type 'object'\)",
    )
    fails([{"q": "a?", "ref": {"reply": "x"}}], "q", "ref", r"record 1: .*'answer' is a required")
    # A task whose answer is a JSON string takes bare text as its reference.
    words = tmp_path / "words.jsonl"
    words.write_text('{"q": "a?", "ref": "Paris"}\n{"q": "b?", "ref": "\\"Rome\\""}\n')
    task = checkpoint_task({**META, "output_schema": {"type": "string"}})
    assert referenced_texts(words, "q", "ref", task) == (["a?", "b?"], ["Paris", '"Rome"'])
    # A --judge config whose judge is off.
    off = tmp_path / "off.yaml"
    cfg = yaml.safe_load(_judge_config(tmp_path).read_text())
    cfg["evaluate"]["judge"]["enabled"] = False
    off.write_text(yaml.safe_dump(cfg))
    fails([ok], "q", "ref", r"evaluate.judge.enabled is false", judge=off)
    # A generative checkpoint from before task_kind was recorded.
    old = tmp_path / "old"
    old.mkdir()
    (old / "distill_checkpoint.json").write_text(
        json.dumps({k: v for k, v in META.items() if k not in ("task_kind", "output_schema")})
    )
    with pytest.raises(ValueError, match="records no task kind, labels or prompt"):
        evaluate_checkpoint(old, tmp_path / "bad.jsonl", "q", "ref")
    # Through the command: exit code 2 and the message, nothing on stdout.
    label_file = tmp_path / "labels.csv"
    label_file.write_text("comment,is_toxic\nyou are kind,0\n")
    res = CliRunner().invoke(
        app,
        ["evaluate", str(checkpoint), "--data", str(label_file), "--text-column", "comment",
         "--label-column", "is_toxic", "--json"],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "does not satisfy the output schema of task 'short-qa'" in res.output


def test_judge_refused_on_a_label_checkpoint(tmp_path):
    # Refused from the checkpoint's metadata, before any model is loaded.
    (tmp_path / "distill_checkpoint.json").write_text(
        json.dumps({"kind": "classifier", "labels": ["0", "1"], "prompt": META["prompt"]})
    )
    data = tmp_path / "d.jsonl"
    data.write_text('{"comment": "fine", "is_toxic": 0}\n')
    with pytest.raises(ValueError, match="is a label task's checkpoint; the LLM judge scores"):
        evaluate_checkpoint(tmp_path, data, "comment", "is_toxic", judge=_judge_config(tmp_path))


def test_plain_output_says_the_judge_was_not_run(checkpoint, answers, tmp_path):
    from typer.testing import CliRunner

    from ray_pipeline.cli import app

    jsonl, _ = _write(tmp_path, _references(answers))
    res = CliRunner().invoke(
        app,
        ["evaluate", checkpoint, "--data", str(jsonl), "--text-column", "question",
         "--label-column", "reference"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "8 rows: exact match 0.5000, ROUGE-L" in res.output
    assert "schema adherence 1.0000, unparsed 0" in res.output
    assert "judge not run: no --judge CONFIG given" in res.output
