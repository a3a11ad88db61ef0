"""`distill evaluate CHECKPOINT --data FILE ...` on a checkpoint and files it never saw, with
no run folder: --json prints one JSON object and nothing else on stdout; CSV, JSONL and Parquet
give the same metrics, equal to scikit-learn's on the student's own answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from ray_pipeline.config import TinyModelSection
from ray_pipeline.data import synthetic
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.evaluate.checkpoint import evaluate_checkpoint
from ray_pipeline.train.checkpoint import save_checkpoint
from ray_pipeline.train.data import Example, encode_classifier_examples, pad_batch
from ray_pipeline.train.model import CLASSIFIER, build_tiny_model
from ray_pipeline.train.student import Student
from ray_pipeline.train.tokenizer import build_tiny_tokenizer, tokenizer_corpus

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]
PROMPT = Prompt(synthetic.PROMPT)


def build_classifier_checkpoint(path: Path) -> str:
    """A tiny classifier student trained a few steps on 48 synthetic comments."""
    texts = synthetic.generate_comments(48, seed=5)
    examples = [
        Example(str(i), PROMPT.messages(t), "", synthetic.true_label(t), t)
        for i, t in enumerate(texts)
    ]
    tok = build_tiny_tokenizer(tokenizer_corpus(examples), vocab_size=400)
    tiny = TinyModelSection(
        hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=128
    )
    model = build_tiny_model(tok, tiny, seed=2, kind=CLASSIFIER, labels=["0", "1"])
    enc, _ = encode_classifier_examples(tok, examples, 96, ["0", "1"])
    batch = pad_batch([e["input_ids"] for e in enc], [e["labels"] for e in enc], tok.pad_token_id)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(10):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    meta = {
        "base_model": "tiny",
        "kind": CLASSIFIER,
        "label_key": "toxic",
        "labels": ["0", "1"],
        "label_aliases": {"true": "1", "false": "0"},
        "prompt": {"template": synthetic.PROMPT, "placeholder": "{input}", "system": None},
        "pad_id": tok.pad_token_id,
    }
    save_checkpoint(
        path,
        model=model.eval(),
        state_dict=model.state_dict(),
        tokenizer=tok,
        method="full",
        meta=meta,
    )
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return build_classifier_checkpoint(tmp_path_factory.mktemp("ckpt") / "student")


def _unseen(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    texts = synthetic.generate_comments(30, seed=99)  # never trained on
    gold = [synthetic.true_label(t) for t in texts]
    table = pa.table({"comment": texts, "is_toxic": [int(g) for g in gold]})
    csv_path = tmp_path / "unseen.csv"
    import pyarrow.csv

    pyarrow.csv.write_csv(table, csv_path)
    pq.write_table(table, tmp_path / "unseen.parquet")
    with open(tmp_path / "unseen.jsonl", "w") as f:
        for row in table.to_pylist():
            f.write(json.dumps(row) + "\n")
    return csv_path, texts, gold


def test_evaluate_json_on_an_unseen_file(checkpoint, tmp_path):
    csv_path, texts, gold = _unseen(tmp_path)
    cmd = [
        sys.executable, "-m", "ray_pipeline.cli", "evaluate", checkpoint, "--data", str(csv_path),
        "--text-column", "comment", "--label-column", "is_toxic", "--json",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert proc.stdout.count("\n") == 1
    # What the student says, row by row, scored by scikit-learn.
    answers = Student.load(checkpoint, device="cpu").answer([PROMPT.messages(t) for t in texts])
    predicted = [str(json.loads(a.text)["toxic"]) for a in answers]
    assert result["rows"] == 30 and result["unparsed"] == 0
    assert result["accuracy"] == pytest.approx(accuracy_score(gold, predicted))
    assert result["roc_auc"] == pytest.approx(
        roc_auc_score([g == "1" for g in gold], [a.probs["1"] for a in answers])
    )
    assert result["kind"] == CLASSIFIER
    # The same file as Parquet and JSONL: the same metrics.
    for name in ("unseen.parquet", "unseen.jsonl"):
        again = evaluate_checkpoint(checkpoint, tmp_path / name, "comment", "is_toxic")
        assert {k: again[k] for k in ("accuracy", "per_class", "roc_auc")} == {
            k: result[k] for k in ("accuracy", "per_class", "roc_auc")
        }


def test_evaluate_names_bad_input(checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"comment": "fine", "is_toxic": 0}\n{"comment": "hm", "is_toxic": "maybe"}\n')
    with pytest.raises(ValueError, match=r"record 2: label 'maybe' in column 'is_toxic'"):
        evaluate_checkpoint(checkpoint, bad, "comment", "is_toxic")
    with pytest.raises(ValueError, match=r"record 1 has no column\(s\) \['text'\]"):
        evaluate_checkpoint(checkpoint, bad, "text", "is_toxic")
    from typer.testing import CliRunner

    from ray_pipeline.cli import app

    res = CliRunner().invoke(app, ["evaluate", str(tmp_path), "--data", str(bad), "--json"])
    assert res.exit_code == 2 and "not a student checkpoint" in res.output
