from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_pipeline.config import LogSource, TaskSection
from ray_pipeline.data.prompts import Prompt
from ray_pipeline.data.schema import FAILED, OK, ROW_SCHEMA, to_table
from ray_pipeline.data.sources import (
    INVALID_UTF8,
    MALFORMED,
    detect_format,
    log_blocks,
    log_rows,
    read_texts,
)

TASK = TaskSection(prompt={"template": "Q: {input}\nA:"}, label_key="label", labels=["0", "1"])
PROMPT = Prompt.from_task(TASK)


def rows_of(data: bytes, path: str, src: LogSource) -> list[dict]:
    return list(log_rows(io.BytesIO(data), path, src, PROMPT, TASK))


def test_jsonl_logs_keep_every_record_and_flag_malformed_lines():
    lines = [
        json.dumps({"input": "hello", "gold": True}),
        '{"input": "cut off',
        "",
        json.dumps({"text": "no input field"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"input": "world", "answer": '{"label": 1}'}),
    ]
    rows = rows_of(
        "\n".join(lines).encode(),
        "logs.jsonl",
        LogSource(path="logs.jsonl", response_field="answer", gold_field="gold"),
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
    rows = rows_of(
        (json.dumps(rec) + "\n" + json.dumps(unanswered)).encode(),
        "x.jsonl",
        LogSource(path="x.jsonl"),
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
    rows = rows_of(
        text.encode(),
        "j.csv",
        LogSource(path="j.csv", input_field="comment_text", gold_field="is_bad"),
    )
    assert [(r["source_line"], r["status"]) for r in rows] == [(2, OK), (4, FAILED), (5, OK)]
    assert rows[0]["input"] == "two\nlines" and rows[0]["gold"] == "1"
    assert "4 fields, header has 3" in rows[1]["reason"]


def test_parquet_logs(tmp_path):
    path = tmp_path / "l.parquet"
    pq.write_table(pa.table({"input": ["a", None, "c"]}), path)
    rows = rows_of(path.read_bytes(), str(path), LogSource(path=path))
    assert [r["status"] for r in rows] == [OK, FAILED, OK]
    assert [r["source_line"] for r in rows] == [1, 2, 3]


def test_limit_and_ids():
    data = "\n".join(json.dumps({"input": t}) for t in ["a", "b", "a"]).encode()
    rows = rows_of(data, "s.jsonl", LogSource(path="s.jsonl", limit=2))
    assert len(rows) == 2
    again = rows_of(data, "s.jsonl", LogSource(path="s.jsonl"))
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
    rows = rows_of(data, "requests.jsonl", LogSource(path="requests.jsonl"))
    assert rows[0]["response"] == '{"label": 1}'
    assert rows[1]["response"] is None and rows[1]["input"] == "x"


def test_jsonl_splits_on_newline_only_and_keeps_unicode_line_separators_inside_records():
    # JSON allows U+2028, U+2029 and U+0085 raw inside strings (the request log writes them
    # raw); str.splitlines would cut the record there.
    texts = ["one\u2028two", "para\u2029graph", "next\u0085line", "plain"]
    data = "".join(json.dumps({"input": t}, ensure_ascii=False) + "\r\n" for t in texts)
    rows = rows_of(data.encode(), "u.jsonl", LogSource(path="u.jsonl"))
    assert [(r["source_line"], r["status"], r["input"]) for r in rows] == [
        (i, OK, t) for i, t in enumerate(texts, 1)
    ]


def test_bytes_that_are_not_utf8_fail_their_record_with_its_line():
    data = b'{"input": "fine"}\n{"input": "caf\xe9 \xff"}\n{"input": "also fine"}\n'
    rows = rows_of(data, "b.jsonl", LogSource(path="b.jsonl"))
    assert [(r["source_line"], r["status"]) for r in rows] == [(1, OK), (2, FAILED), (3, OK)]
    assert rows[1]["reason"].startswith(f"{INVALID_UTF8}: byte 0xe9 at byte 15")
    assert "\ufffd" in rows[1]["input"]  # shown to a person with replacement characters only
    csv_data = b'id,input\n1,ok\n2,"bad \xc3\x28 cell\nacross lines"\n3,fine\n'
    rows = rows_of(csv_data, "b.csv", LogSource(path="b.csv"))
    assert [(r["source_line"], r["status"]) for r in rows] == [(2, OK), (3, FAILED), (5, OK)]
    assert rows[1]["reason"] == f"{INVALID_UTF8}: byte 0xc3 is not UTF-8"


def test_a_json_lone_surrogate_escape_fails_the_record():
    data = b'{"input": "half a pair \\ud800"}\n{"input": "whole \\ud83d\\ude00"}\n'
    rows = rows_of(data, "s.jsonl", LogSource(path="s.jsonl"))
    assert [r["status"] for r in rows] == [FAILED, OK]
    assert rows[0]["reason"].startswith(f"{INVALID_UTF8}: field 'input' holds a lone surrogate")
    assert rows[1]["input"] == "whole \U0001f600"
    to_table(rows)  # and every row still fits the schema (Arrow strings are UTF-8)


def test_a_log_streams_as_blocks_with_every_record_once(tmp_path):
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"input": f"comment {i}"}) for i in range(50)]
    lines[17] = "not json"
    path.write_text("\n".join(lines) + "\n")
    blocks = list(log_blocks(LogSource(path=path), TASK, block_rows=8))
    assert [b.num_rows for b in blocks] == [8] * 6 + [2]
    rows = [r for b in blocks for r in b.to_pylist()]
    assert [r["source_line"] for r in rows] == list(range(1, 51))
    assert [r["status"] for r in rows].count(FAILED) == 1 and rows[17]["status"] == FAILED
    assert {r["source"] for r in rows} == {str(path)}
    limited = list(log_blocks(LogSource(path=path, limit=20), TASK, block_rows=8))
    assert [b.num_rows for b in limited] == [8, 8, 4]


def test_skip_limit_teacher_names_votes_users_and_gold_answers():
    lines = [
        json.dumps(
            {
                "input": f"text {i}",
                "a": '{"label": 1}',
                "b": '{"label": 0}' if i else "",
                "g": "0",
                "who": f"u{i}",
            }  # fmt: skip
        )
        for i in range(5)
    ]
    data = "\n".join(lines).encode()
    voted = LogSource(
        path="l.jsonl", response_field="a", teacher="gpt", vote_fields={"cot": "b"},
        user_field="who", limit=2,
    )  # fmt: skip
    rows = rows_of(data, "l.jsonl", voted)
    assert [r["source_line"] for r in rows] == [1, 2]
    assert [r["teacher"] for r in rows] == ["gpt", "gpt"] and rows[1]["user"] == "u1"
    assert json.loads(rows[0]["votes"]) == [
        {"teacher": "gpt", "sample": 0, "response": '{"label": 1}'},
        {"teacher": "cot", "sample": None, "response": None, "error": "no answer in 'b'"},
    ]
    assert json.loads(rows[1]["votes"])[1]["response"] == '{"label": 0}'
    gold = LogSource(path="l.jsonl", gold_field="g", label_from="gold", skip=3)
    rows = rows_of(data, "l.jsonl", gold)
    assert [r["source_line"] for r in rows] == [4, 5]
    assert all(r["response"] == '{"label": 0}' and r["teacher"] == "gold:g" for r in rows)
    assert rows[0]["gold"] == "0"


def test_gold_answers_need_a_gold_label_and_keep_an_unknown_one_for_curation():
    data = b'{"input": "a", "g": "maybe"}\n{"input": "b"}\n'
    rows = rows_of(data, "l.jsonl", LogSource(path="l.jsonl", gold_field="g", label_from="gold"))
    assert rows[0]["response"] == '{"label": "maybe"}' and rows[0]["gold"] == "maybe"
    assert rows[1]["status"] == FAILED and "no gold label in field 'g'" in rows[1]["reason"]


def test_openai_records_name_their_user():
    rec = {
        "request": {"messages": [{"role": "user", "content": "Q: hi\nA:"}], "user": "alice"},
        "response": {"choices": [{"message": {"content": '{"label": 1}'}}]},
    }
    rows = rows_of(json.dumps(rec).encode(), "r.jsonl", LogSource(path="r.jsonl"))
    assert rows[0]["user"] == "alice" and rows[0]["input"] == "hi"
