from __future__ import annotations

import json
import random
import threading
from collections import Counter

import pytest
from pydantic import ValidationError

from serve_apps.completions import RequestLog, completion
from serve_apps.router import RouterArgs, pick_target


def test_pick_target_follows_weights_and_explicit_model():
    rng = random.Random(0)
    counts = Counter(
        pick_target({"student": 0.9, "teacher": 0.1}, "auto", rng) for _ in range(5000)
    )
    assert 0.88 < counts["student"] / 5000 < 0.92
    assert pick_target({"student": 0.9, "teacher": 0.1}, "teacher", rng) == "teacher"
    assert {pick_target({"student": 1.0, "teacher": 0.0}, None, rng) for _ in range(100)} == {
        "student"
    }


def test_router_args_validation():
    a = RouterArgs.model_validate(
        {
            "checkpoint": "c",
            "teacher_base_url": "u",
            "teacher_model": "m",
            "weights": '{"student": 0.5, "teacher": 0.5}',
        }
    )
    assert a.weights == {"student": 0.5, "teacher": 0.5}
    with pytest.raises(ValidationError, match="weights must map"):
        RouterArgs.model_validate(
            {
                "checkpoint": "c",
                "teacher_base_url": "u",
                "teacher_model": "m",
                "weights": {"canary": 1},
            }
        )
    with pytest.raises(ValidationError, match="Extra inputs"):
        RouterArgs.model_validate(
            {
                "checkpoint": "c",
                "teacher_base_url": "u",
                "teacher_model": "m",
                "api_key": "sk-secret",
            }
        )


def test_completion_body_is_an_openai_chat_completion():
    body = completion("student", "hi there", 5, 2)
    assert (
        body["object"] == "chat.completion"
        and body["choices"][0]["message"]["content"] == "hi there"
    )
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_request_log_lines_never_interleave(tmp_path):
    log = RequestLog(tmp_path / "sub" / "requests.jsonl")
    big = "x" * 20000

    def writer(k):
        for i in range(50):
            log.write({"writer": k, "i": i, "pad": big})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    lines = (tmp_path / "sub" / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 200
    assert Counter(json.loads(x)["writer"] for x in lines) == {0: 50, 1: 50, 2: 50, 3: 50}
