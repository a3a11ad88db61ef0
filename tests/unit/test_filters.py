from __future__ import annotations

from ray_pipeline.config import CurateSection, TaskSection
from ray_pipeline.curate.filters import (
    LabelFilter,
    MarkDuplicates,
    RuleFilter,
    TestOverlapFilter,
    find_exact_duplicates,
    normalize_text,
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
        **kw,
    )


def test_rule_filter_reasons():
    f = RuleFilter(
        CurateSection(
            min_chars=3, max_chars=10, max_response_chars=20, exclude_patterns=["(?i)http"]
        )
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


def test_test_overlap():
    rows = TestOverlapFilter({normalize_text("Hello  World"): "balanced"})(
        [row("hello world"), row("hello")]
    )
    assert rows[0]["reason"] == "test_overlap: input is in test set 'balanced'"
    assert rows[1]["status"] == OK


def test_exact_dedup_keeps_first_by_source_and_line():
    rows = [
        row("B  x", line=3),
        row("b x", line=1),
        row("b X", line=2, source="a"),
        row("other", line=4),
        row("b x", line=5, status=FAILED),
    ]
    dups = find_exact_duplicates(rows)
    # source "a" sorts first, so its line-2 row is the one kept.
    assert dups == {("s", 1): "a-b X", ("s", 3): "a-b X"}
    marked = MarkDuplicates(dups)(rows)
    assert [r["status"] for r in marked] == [FILTERED, FILTERED, OK, OK, FAILED]
    assert marked[0]["reason"] == "duplicate: same input as row a-b X"


def test_verbatim_repeats_in_one_file_share_an_id_but_one_is_kept():
    a, b = row("same", line=1), row("same", line=2)
    assert a["id"] == b["id"]
    marked = MarkDuplicates(find_exact_duplicates([a, b]))([a, b])
    assert [r["status"] for r in marked] == [OK, FILTERED]
