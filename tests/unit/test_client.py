from __future__ import annotations

import pickle
import random

from ray_pipeline.teacher.client import TeacherCallError, backoff_s, retry_after_s


def test_retry_after_headers():
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_s({}) is None and retry_after_s(None) is None


def test_backoff_is_jittered_exponential_and_capped():
    rng = random.Random(0)
    for attempt in range(1, 10):
        for _ in range(50):
            assert 0 <= backoff_s(attempt, 0.5, 8.0, rng) <= min(8.0, 0.5 * 2 ** (attempt - 1))


def test_teacher_call_error_survives_pickling():
    e = pickle.loads(
        pickle.dumps(TeacherCallError("Error code: 500", "InternalServerError", 500, 3))
    )
    assert (str(e), e.error_class, e.status_code, e.attempts) == (
        "Error code: 500",
        "InternalServerError",
        500,
        3,
    )
