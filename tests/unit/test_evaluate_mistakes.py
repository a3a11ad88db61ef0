"""The mistakes page: every student error and every student/teacher disagreement, parsed back
out of the HTML with the standard library's parser."""

from __future__ import annotations

from html.parser import HTMLParser

from ray_pipeline.evaluate.mistakes import mistake_rows, render_mistakes_html


class Page(HTMLParser):
    """Rows of the #mistakes table (cells' text and the row's data-* attributes), the
    options of the filter selects, and whether a script is present."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []
        self.options: dict[str, list[str]] = {}
        self._select: str | None = None
        self._cell: list[str] | None = None
        self.script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-kind" in a:
            self.rows.append({"attrs": a, "cells": []})
        elif tag == "td" and self.rows:
            self._cell = []
        elif tag == "select":
            self._select = a["id"]
            self.options[self._select] = []
        elif tag == "option" and self._select:
            self.options[self._select].append(a["value"])
        elif tag == "script":
            self.script = True

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1]["cells"].append("".join(self._cell))
            self._cell = None
        elif tag == "select":
            self._select = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


STUDENT = [
    {
        "id": "a",
        "source_line": 1,
        "input": "you <b>idiot</b> & co",
        "gold": "1",
        "label": "0",
        "confidence": 0.91,
    },
    {
        "id": "b",
        "source_line": 2,
        "input": "nice edit",
        "gold": "0",
        "label": "0",
        "confidence": 0.8,
    },
    {"id": "c", "source_line": 3, "input": "thanks", "gold": "0", "label": "1", "confidence": 0.55},
    {"id": "d", "source_line": 4, "input": "fine", "gold": "0", "label": None, "confidence": None},
    {"id": "e", "source_line": 5, "input": "ok then", "gold": "1", "label": "1", "confidence": 0.7},
]
TEACHER = {"a": "1", "b": "1", "c": "1", "d": "0", "e": "1"}


def test_mistake_rows_hold_every_error_then_the_disagreements():
    rows = mistake_rows(STUDENT, TEACHER, ["0", "1"])
    assert [(r["kind"], r["line"], r["error_type"]) for r in rows] == [
        ("error", 1, "false negative"),
        ("error", 3, "false positive"),
        ("error", 4, "unparsed"),
        ("disagreement", 2, ""),  # student right, teacher wrong
    ]
    assert [r["teacher_right"] for r in rows] == [True, False, True, False]
    three = mistake_rows([{**STUDENT[0], "gold": "2"}], {}, ["0", "1", "2"])
    assert three[0]["error_type"] == "2 → 0" and three[0]["teacher"] is None


def test_page_lists_every_row_escaped_with_sort_and_filter_controls():
    rows = mistake_rows(STUDENT, TEACHER, ["0", "1"])
    page = Page()
    page.feed(render_mistakes_html("balanced <set>", rows, scored_rows=len(STUDENT)))
    assert len(page.rows) == 4
    first = page.rows[0]
    # kind, line, input, gold, teacher, student, confidence, error type
    assert first["cells"] == [
        "error",
        "1",
        "you <b>idiot</b> & co",
        "1",
        "1",
        "0",
        "0.9100",
        "false negative",
    ]
    assert first["attrs"]["data-error-type"] == "false negative"
    assert first["attrs"]["data-confidence"] == "0.9100"
    assert (
        page.rows[2]["cells"][5] == "(unparsed)"
        and page.rows[2]["attrs"]["data-confidence"] == "NaN"
    )
    assert [r["attrs"]["data-kind"] for r in page.rows] == ["error"] * 3 + ["disagreement"]
    assert page.options["kind"] == ["", "error", "disagreement"]
    assert page.options["type"] == ["", "false negative", "false positive", "unparsed"]
    assert page.script
