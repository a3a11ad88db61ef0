from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_pipeline.config import LogSource, TaskSection
from ray_pipeline.data.schema import FAILED, OK, ROW_SCHEMA, to_table
from ray_pipeline.data.sources import MALFORMED, detect_format, log_rows, read_texts
from ray_pipeline.teacher.prompts import Prompt

TASK = TaskSection(prompt={"template": "Q: {input}\nA:"}, label_key="label", labels=["0", "1"])
PROMPT = Prompt.from_task(TASK)


def test_jsonl_logs_keep_every_record_and_flag_malformed_lines():
    lines = [
        json.dumps({"input": "hello", "gold": True}),
        '{"input": "cut off',
        "",
        json.dumps({"text": "no input field"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"input": "world", "answer": '{"label": 1}'}),
    ]
    rows = log_rows(
        "\n".join(lines).encode(),
        "logs.jsonl",
        LogSource(path="logs.jsonl", response_field="answer", gold_field="gold"),
        PROMPT,
        TASK,
    )
    assert [r["source_line"] for r in rows] == [1, 2, 4, 5, 6]
    assert [r["status"] for r in rows] == [OK, FAILED, FAILED, FAILED, OK]
    assert rows[1]["reason"].startswith(f"{MALFORMED}: invalid JSON")
    assert "no text in field 'input'" in rows[2]["reason"]
    assert "expected a JSON object, got list" in rows[3]["reason"]
    assert rows[0]["gold"] == "1" and rows[0]["response"] is None
    assert json.loads(rows[0]["messages"]) == [{"role": "user", "content": "Q: hello\nA:"}]
    assert rows[4]["response"] == '{"label": 1}' and rows[4]["teacher"] == "recorded:answer"
    to_table(rows)  # every row fits the schema


def test_openai_style_records():
    rec = {
        "request": {
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "be nice"},
                {"role": "user", "content": "Q: the input\nA:"},
            ],
        },
        "response": {
            "model": "gpt-4o-2024",
            "choices": [{"message": {"role": "assistant", "content": '{"label": 0}'}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3},
        },
    }
    unanswered = {"request": {"messages": [{"role": "user", "content": "free text prompt"}]}}
    rows = log_rows(
        (json.dumps(rec) + "\n" + json.dumps(unanswered)).encode(),
        "x.jsonl",
        LogSource(path="x.jsonl"),
        PROMPT,
        TASK,
    )
    assert rows[0]["input"] == "the input" and rows[0]["prompt_hash"] == PROMPT.hash
    assert rows[0]["response"] == '{"label": 0}' and rows[0]["teacher"] == "gpt-4o-2024"
    assert rows[0]["prompt_tokens"] == 12 and len(json.loads(rows[0]["messages"])) == 2
    assert (
        rows[1]["input"] == "free text prompt"
        and rows[1]["response"] is None
        and rows[1]["prompt_hash"] is None
    )


def test_csv_logs_with_multiline_cells_and_bad_records():
    text = 'id,comment_text,is_bad\n1,"two\nlines",True\n2,ok,False,extra\n3,fine,False\n'
    rows = log_rows(
        text.encode(),
        "j.csv",
        LogSource(path="j.csv", input_field="comment_text", gold_field="is_bad"),
        PROMPT,
        TASK,
    )
    assert [(r["source_line"], r["status"]) for r in rows] == [(2, OK), (4, FAILED), (5, OK)]
    assert rows[0]["input"] == "two\nlines" and rows[0]["gold"] == "1"
    assert "4 fields, header has 3" in rows[1]["reason"]


def test_parquet_logs(tmp_path):
    path = tmp_path / "l.parquet"
    pq.write_table(pa.table({"input": ["a", None, "c"]}), path)
    rows = log_rows(path.read_bytes(), str(path), LogSource(path=path), PROMPT, TASK)
    assert [r["status"] for r in rows] == [OK, FAILED, OK]
    assert [r["source_line"] for r in rows] == [1, 2, 3]


def test_limit_and_ids():
    data = "\n".join(json.dumps({"input": t}) for t in ["a", "b", "a"]).encode()
    rows = log_rows(data, "s.jsonl", LogSource(path="s.jsonl", limit=2), PROMPT, TASK)
    assert len(rows) == 2
    again = log_rows(data, "s.jsonl", LogSource(path="s.jsonl"), PROMPT, TASK)
    assert again[0]["id"] == again[2]["id"] != again[1]["id"]  # id = hash(source, input)


def test_detect_format_and_read_texts(tmp_path):
    assert detect_format("a/b.JSONL") == "jsonl" and detect_format("x.txt", "csv") == "csv"
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format("x.txt")
    p = tmp_path / "t.jsonl"
    p.write_text('{"input": "a"}\n{"input": ""}\n')
    with pytest.raises(ValueError, match="record 2 has no text in field 'input'"):
        read_texts(p, "input")


def test_schema_is_stable():
    assert ROW_SCHEMA.names[:4] == ["id", "source", "source_line", "input"]
    assert {
        "status",
        "reason",
        "gold",
        "split",
        "cost",
        "prompt_tokens",
        "completion_tokens",
    } <= set(ROW_SCHEMA.names)


def test_request_log_records_only_keep_teacher_answers():
    """The router's request log is a log source: the student's answers are not labels."""

    def rec(served_by):
        return {
            "request": {"messages": [{"role": "user", "content": "Q: x\nA:"}]},
            "response": {"choices": [{"message": {"content": '{"label": 1}'}}]},
            "served_by": served_by,
        }

    data = "\n".join(json.dumps(rec(s)) for s in ("teacher", "student")).encode()
    rows = log_rows(data, "requests.jsonl", LogSource(path="requests.jsonl"), PROMPT, TASK)
    assert rows[0]["response"] == '{"label": 1}'
    assert rows[1]["response"] is None and rows[1]["input"] == "x"
