"""The router's OpenAI wire format: strict validation (every bad request a 4xx naming its
parameter, never another exception) and response bodies the openai client's own types accept."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from serve_apps.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Reply,
    chat_body,
    chat_messages,
    chat_stream,
    completion_body,
    completion_stream,
    parse_request,
)

GOOD = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}


def refused(body, kind=ChatRequest) -> ApiError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ApiError) as exc:
        parse_request(raw, kind)
    return exc.value


def test_a_good_request_parses_and_text_parts_join():
    req = parse_request(json.dumps({**GOOD, "max_tokens": 5, "stop": "x"}).encode(), ChatRequest)
    assert req.token_limit() == 5 and chat_messages(req) == GOOD["messages"]
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    }
    req = parse_request(json.dumps({**GOOD, "messages": [parts]}).encode(), ChatRequest)
    assert chat_messages(req) == [{"role": "user", "content": "ab"}]
    req = parse_request(b'{"model": "m", "prompt": ["hi"], "max_tokens": 3}', CompletionRequest)
    assert chat_messages(req) == [{"role": "user", "content": "hi"}] and req.token_limit() == 3


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        # What a user found answered 502, 500 or 200 (the issue), each now a 400:
        ({"max_tokens": -1}, "max_tokens", "invalid_value"),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "missing_required_parameter"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
        ({"n": 1000}, "n", "invalid_value"),
        ({"n": 2}, "n", "unsupported_value"),
        ({"logprobs": True}, "logprobs", "unsupported_value"),
        ({"top_logprobs": 3}, "top_logprobs", "unsupported_value"),
        # and the rest of what OpenAI refuses or a student cannot honour:
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_value"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].type",
            "invalid_value",
        ),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages", "invalid_value"),
        ({"max_tokens": 1.5}, "max_tokens", "invalid_value"),
        ({"max_tokens": True}, "max_tokens", "invalid_value"),
        ({"max_tokens": 2, "max_completion_tokens": 2}, "max_tokens", "invalid_value"),
        ({"temperature": 3}, "temperature", "invalid_value"),
        ({"temperature": 0.7}, "temperature", "unsupported_value"),
        ({"top_p": 1.5}, "top_p", "invalid_value"),
        ({"presence_penalty": 1}, "presence_penalty", "unsupported_value"),
        ({"logit_bias": {"1": 5}}, "logit_bias", "unsupported_value"),
        ({"stop": [1]}, "stop[0]", "invalid_value"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "unsupported_value"),
        ({"tools": []}, "tools", "unsupported_parameter"),
        ({"frobnicate": 1}, "frobnicate", "unrecognized_argument"),
        ({"model": ""}, "model", "invalid_value"),
        ({"model": 5}, "model", "invalid_value"),
    ],
)
def test_each_bad_parameter_is_a_400_naming_it(change, param, code):
    e = refused({**GOOD, **change})
    assert (e.status, e.param, e.code) == (400, param, code), e.body()
    body = e.body()["error"]
    assert body["type"] == "invalid_request_error" and body["message"]


def test_a_missing_model_or_messages_is_named():
    assert refused({"messages": GOOD["messages"]}).param == "model"
    assert refused({"model": "auto"}).param == "messages"
    assert refused({"model": "m"}, CompletionRequest).param == "prompt"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (
            b'{"model": "a", "messages": [{"role": "user", "content": "\\ud800"}]}',
            "invalid_encoding",
        ),
        (b'{"model": "a\\udfff", "messages": []}', "invalid_encoding"),
        (b"\xff\xfe{}", "invalid_encoding"),
        (b'{"model": "caf\xe9"}', "invalid_encoding"),
        (b"{", "invalid_json"),
        (b"", "invalid_json"),
        (b'{"temperature": NaN}', "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
        (b'[{"model": "a"}]', "invalid_json"),
        (b'"a string"', "invalid_json"),
    ],
)
def test_undecodable_bodies_are_400(raw, code):
    e = refused(raw)
    assert (e.status, e.code) == (400, code)


def test_a_paired_surrogate_escape_is_a_character():
    raw = b'{"model": "a", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    assert chat_messages(parse_request(raw, ChatRequest))[0]["content"] == "\U0001f600"


def test_completion_refusals():
    base = {"model": "m", "prompt": "hi"}
    assert refused({**base, "echo": True}, CompletionRequest).code == "unsupported_value"
    assert refused({**base, "prompt": ["a", "b"]}, CompletionRequest).param == "prompt"
    assert refused({**base, "logprobs": 2}, CompletionRequest).param == "logprobs"
    assert refused({**base, "best_of": 3}, CompletionRequest).param == "best_of"
    assert refused({**base, "prompt": [1, 2]}, CompletionRequest).code == "invalid_value"


# Bodies that break exactly one rule, on top of a valid request with random valid extras.
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_VALID = st.fixed_dictionaries(
    {"model": st.sampled_from(["auto", "student", "teacher"])},
    optional={
        "max_tokens": st.integers(1, 64),
        "stop": st.one_of(_TEXT, st.lists(_TEXT, max_size=4)),
        "seed": st.integers(-(2**31), 2**31),
        "top_p": st.floats(0, 1),
        "user": _TEXT,
        "temperature": st.just(0),
    },
).map(lambda d: {**d, "messages": [{"role": "user", "content": "a comment"}]})
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)
_BREAKS = st.one_of(
    st.tuples(st.just("max_tokens"), st.integers(max_value=0) | st.text() | st.floats()),
    st.tuples(st.just("n"), st.integers(2, 10**6) | st.integers(max_value=0)),
    st.tuples(st.just("temperature"), st.floats(0.001, 100) | st.floats(max_value=-0.001)),
    st.tuples(st.just("logprobs"), st.just(True)),
    st.tuples(
        st.just("messages"), st.lists(_JSON.filter(lambda v: not isinstance(v, dict)), max_size=3)
    ),
    st.tuples(
        st.just("messages"),
        st.lists(
            st.fixed_dictionaries(
                {
                    "role": _TEXT.filter(
                        lambda r: r not in ("system", "developer", "user", "assistant")
                    )
                },
                optional={"content": _JSON},
            ),
            min_size=1,
            max_size=3,
        ),
    ),
    st.tuples(
        st.just("messages"),
        st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.just("user"),
                    "content": _JSON.filter(lambda c: not isinstance(c, str | list)),
                }
            ),
            min_size=1,
            max_size=2,
        ),
    ),
    st.tuples(st.text(min_size=1).filter(lambda k: k not in ChatRequest.model_fields), _JSON),
    st.tuples(st.sampled_from(["stop"]), st.lists(_TEXT, min_size=5, max_size=8)),
    st.tuples(st.sampled_from(["model", "user"]), st.integers() | st.lists(_TEXT)),
)


@st.composite
def malformed(draw) -> bytes:
    """A body with at least one problem: a broken rule, a lone surrogate, bad bytes, not an
    object, or cut short."""
    how = draw(st.sampled_from(["rule", "surrogate", "bytes", "not_object", "truncated"]))
    body = draw(_VALID)
    if how == "rule":
        key, value = draw(_BREAKS)
        body[key] = value
        return json.dumps(body).encode()
    if how == "surrogate":
        text = json.dumps({**body, "messages": [{"role": "user", "content": "x@y"}]})
        escape = draw(st.sampled_from(["\\ud800", "\\udbff", "\\udc00", "\\udfff"]))
        return text.replace("@", escape).encode()
    if how == "bytes":
        raw = json.dumps(body).encode()
        at = draw(st.integers(0, len(raw)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80"]))
        return raw[:at] + bad + raw[at:]
    if how == "not_object":
        return json.dumps(draw(_JSON.filter(lambda v: not isinstance(v, dict)))).encode()
    raw = json.dumps(body).encode()
    return raw[: draw(st.integers(0, len(raw) - 1))]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed())
def test_every_malformed_body_is_a_4xx(raw):
    with pytest.raises(ApiError) as exc:
        parse_request(raw, ChatRequest)
    assert 400 <= exc.value.status < 500 and exc.value.body()["error"]["message"]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200) | _JSON.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_parse_or_are_a_4xx(raw):
    for kind in (ChatRequest, CompletionRequest):
        try:
            parse_request(raw, kind)
        except ApiError as e:
            assert 400 <= e.status < 500


def test_bodies_are_what_the_openai_client_parses():
    reply = Reply('{"toxic": 1} and more', prompt_tokens=7, completion_tokens=4)
    chat = ChatCompletion.model_validate(chat_body("chatcmpl-1", "student", reply))
    assert chat.choices[0].message.content == reply.text and chat.usage.total_tokens == 11
    text = Completion.model_validate(completion_body("cmpl-1", "student", reply))
    assert text.choices[0].text == reply.text and text.usage.prompt_tokens == 7
    for events, usage in (
        (chat_stream("c", "s", reply, True), True),
        (chat_stream("c", "s", reply, False), False),
    ):
        assert events[-1] == "data: [DONE]\n\n"
        chunks = [ChatCompletionChunk.model_validate(json.loads(e[6:])) for e in events[:-1]]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.text
        assert chunks[-2 if usage else -1].choices[0].finish_reason == "stop"
        assert (chunks[-1].usage is not None) == usage
    pieces = [json.loads(e[6:]) for e in completion_stream("c", "s", reply, True)[:-1]]
    assert "".join(p["choices"][0]["text"] for p in pieces if p["choices"]) == reply.text


def test_stop_sequences_cut_the_answer():
    reply = Reply('{"toxic": 1}\nand more', 1, 9, "length")
    assert reply.cut_at(["\n", "more"]).text == '{"toxic": 1}'
    assert reply.cut_at(["\n"]).finish_reason == "stop"
    assert reply.cut_at("zzz") is reply and reply.cut_at(None) is reply
