from __future__ import annotations

import os

from ray_pipeline.teacher.cache import ResponseCache, cache_key

MSGS = [{"role": "user", "content": "hi"}]


def test_key_covers_everything_that_changes_the_answer():
    base = cache_key("http://x/v1", "m", MSGS, {"temperature": 0, "max_tokens": 5})
    assert base == cache_key("http://x/v1/", "m", MSGS, {"max_tokens": 5, "temperature": 0})
    assert base != cache_key("http://y/v1", "m", MSGS, {"temperature": 0, "max_tokens": 5})
    assert base != cache_key("http://x/v1", "m2", MSGS, {"temperature": 0, "max_tokens": 5})
    assert base != cache_key(
        "http://x/v1",
        "m",
        [{"role": "user", "content": "hi!"}],
        {"temperature": 0, "max_tokens": 5},
    )
    assert base != cache_key(
        "http://x/v1",
        "m",
        MSGS,
        {"temperature": 0, "max_tokens": 5, "response_format": {"type": "json_object"}},
    )


def test_key_says_whether_and_how_many_logprobs_were_asked():
    """An answer cached without logprobs must not answer a request that wants them."""
    params = {"temperature": 0, "max_tokens": 5}
    keys = {
        cache_key("e", "m", MSGS, {**params, **extra})
        for extra in (
            {},
            {"logprobs": True},
            {"logprobs": True, "top_logprobs": 1},
            {"logprobs": True, "top_logprobs": 5},
        )
    }
    assert len(keys) == 4


def test_put_get_is_durable_and_atomic(tmp_path):
    cache = ResponseCache(tmp_path / "c")
    key = cache_key("e", "m", MSGS, {})
    assert cache.get(key) is None
    cache.put(key, {"texts": ["a"], "n": 1})
    assert ResponseCache(tmp_path / "c").get(key) == {
        "texts": ["a"],
        "n": 1,
    }  # another process's view
    assert len(cache) == 1
    leftovers = [p for p in (tmp_path / "c").rglob("*") if p.is_file() and p.suffix == ".tmp"]
    assert leftovers == [] and os.listdir(tmp_path / "c")
