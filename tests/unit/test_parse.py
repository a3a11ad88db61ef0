from __future__ import annotations

import csv

import pytest

from ray_pipeline.data.schema import normalize_label
from ray_pipeline.teacher.parse import ParseError, parse_answer, parse_list, parse_structured

ALIASES = {"true": "1", "false": "0"}


@pytest.mark.parametrize(
    ("text", "mode", "label"),
    [
        ('```json\n{\n  "is_bad": 1\n}\n```', "json", "1"),
        ('{"is_bad": 0}', "json", "0"),
        ("```python\n{'is_bad': 1}\n```", "python", "1"),
        ('Sure! Here is my answer: {"is_bad": true} Hope it helps.', "json", "1"),
        ("```\n{'reason': 'a } brace in a string', 'is_bad': 0}\n```", "python", "0"),
        ("{\n 'reason_innocent': The comment is fine,\n 'is_bad': 0\n}", "regex", "0"),
        ('{"is_bad": "1"}', "json", "1"),
        ('{"is_bad": 1.0}', "json", "1"),
    ],
)
def test_parse_answer_formats(text, mode, label):
    parsed = parse_answer(text, "is_bad", ["0", "1"], ALIASES)
    assert (parsed.mode, parsed.label, parsed.error) == (mode, label, None)


def test_parse_failures_say_why():
    assert parse_answer("", "is_bad", ["0", "1"], ALIASES).error.startswith(
        "parse_error: empty answer"
    )
    assert parse_answer("I cannot help with that.", "is_bad", ["0", "1"], ALIASES).error.startswith(
        "parse_error"
    )
    missing = parse_answer('{"toxic": 1}', "is_bad", ["0", "1"], ALIASES)
    assert missing.output == {"toxic": 1} and missing.label is None
    assert missing.error == "missing_label: answer has no key 'is_bad'"
    invalid = parse_answer('{"is_bad": 7}', "is_bad", ["0", "1"], ALIASES)
    assert invalid.error == "invalid_label: 7 is not one of ['0', '1']"
    listy = parse_answer("[1, 2]", "is_bad", ["0", "1"], ALIASES)
    assert listy.output is None and "list, not an object" in listy.error


def test_normalize_label():
    assert normalize_label(True, ["0", "1"], ALIASES) == "1"
    assert normalize_label("False", ["0", "1"], ALIASES) == "0"
    assert normalize_label("Positive", ["negative", "positive"], {}) == "positive"
    assert normalize_label("maybe", ["0", "1"], ALIASES) is None


def test_parse_structured_prefers_fenced_block():
    value, mode = parse_structured('Answer {"a": 1}\n```json\n{"b": 2}\n```')
    assert value == {"b": 2} and mode == "json"
    with pytest.raises(ParseError):
        parse_structured("nothing here")


def test_parse_list():
    assert parse_list('["a", " b ", ""]') == ["a", "b"]
    assert parse_list('```json\n["x", "y"]\n```') == ["x", "y"]
    assert parse_list("1. first\n- second\n\n* third") == ["first", "second", "third"]


def test_jigsaw_gpt4_responses_parse_to_published_accuracy(jigsaw_dir):
    """The real GPT-4 logs: every answer parses; accuracy matches the case study (88.75%)."""
    with open(jigsaw_dir / "test.balanced.gpt-4.responses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    correct = 0
    for r in rows:
        parsed = parse_answer(r["simple_prompt"], "is_bad", ["0", "1"], ALIASES)
        assert parsed.label is not None, r["simple_prompt"]
        correct += parsed.label == normalize_label(r["is_bad"], ["0", "1"], ALIASES)
    assert correct == 355 and len(rows) == 400  # 88.75 %
    cot = [parse_answer(r["cot_prompt"], "is_bad", ["0", "1"], ALIASES) for r in rows]
    assert all(p.label is not None for p in cot)
