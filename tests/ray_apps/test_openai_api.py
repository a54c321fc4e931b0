"""OpenAI request validation, response/SSE formatting, auth, tenant header and
stop sequences: pure Python, no Ray, no model.

Every rejection must name the bad field (``param``) and, for a limit, the limit.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_apps.openai_api import (DONE, TENANT_HEADER, APIError, Limits, StopBuffer, check_auth, chunk, parse_body,
                                 parse_chat, parse_completion, response, sse, tenant_of, usage)

L = Limits()
M = "SmolLM2-135M-Instruct"


def err(fn, *a) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*a)
    body = e.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return e.value


def test_completion_defaults_and_fields():
    r = parse_completion({"model": M, "prompt": "Hi", "max_tokens": 5, "temperature": 0, "stop": "\n"}, L, M)
    assert (r.chat, r.prompts, r.stream) == (False, ("Hi",), False)
    assert (r.sampling.max_tokens, r.sampling.temperature, r.sampling.stop) == (5, 0.0, ("\n",))
    assert parse_completion({"model": M, "prompt": ["a", "b"]}, L).inputs() == [{"prompt": "a"}, {"prompt": "b"}]
    assert parse_completion({"model": M, "prompt": "x"}, L).sampling.max_tokens == L.default_max_tokens


def test_chat_parses_messages_and_text_parts():
    r = parse_chat({"model": M, "messages": [{"role": "developer", "content": "be brief"},
                                             {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                    "stream": True, "stream_options": {"include_usage": True}, "max_completion_tokens": 3}, L, M)
    assert r.chat and r.stream and r.include_usage and r.sampling.max_tokens == 3
    assert r.inputs() == [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]}]


@pytest.mark.parametrize("body, param, code", [
    ({"prompt": "x"}, "model", "missing_required_parameter"),
    ({"model": M}, "prompt", "missing_required_parameter"),
    ({"model": M, "prompt": 5}, "prompt", "invalid_value"),
    ({"model": M, "prompt": ""}, "prompt", "invalid_value"),
    ({"model": M, "prompt": "x", "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"model": M, "prompt": "x", "max_tokens": "5"}, "max_tokens", "invalid_value"),
    ({"model": M, "prompt": "x", "max_tokens": 10_000}, "max_tokens", "max_tokens_exceeded"),
    ({"model": M, "prompt": "x", "temperature": 3}, "temperature", "invalid_value"),
    ({"model": M, "prompt": "x", "temperature": float("nan")}, "temperature", "invalid_value"),
    ({"model": M, "prompt": "x", "top_p": 0}, "top_p", "invalid_value"),
    ({"model": M, "prompt": "x", "stop": 7}, "stop", "invalid_value"),
    ({"model": M, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"model": M, "prompt": "x", "stop": [""]}, "stop", "invalid_value"),
    ({"model": M, "prompt": "x", "stream": "yes"}, "stream", "invalid_value"),
    ({"model": M, "prompt": "x", "n": 2}, "n", "unsupported_parameter"),
    ({"model": M, "prompt": "x", "logprobs": 3}, "logprobs", "unsupported_parameter"),
    ({"model": M, "prompt": "x", "echo": True}, "echo", "unsupported_parameter"),
    ({"model": M, "prompt": "x", "seed": 1.5}, "seed", "invalid_value"),
    ({"model": M, "prompt": ["x"] * 9}, "prompt", "batch_too_large"),
])
def test_bad_completion_requests_name_the_field(body, param, code):
    e = err(parse_completion, body, L, M)
    assert e.status == 400 and e.param == param and e.code == code


def test_limits_are_named_in_the_message():
    assert "max_tokens_cap=512" in err(parse_completion, {"model": M, "prompt": "x", "max_tokens": 513}, L).message
    assert "max_batch=8" in err(parse_completion, {"model": M, "prompt": ["x"] * 9}, L).message
    assert "max_stop=4" in err(parse_completion, {"model": M, "prompt": "x", "stop": list("abcde")}, L).message
    e = err(parse_body, b" " * (L.max_body_bytes + 1), L)
    assert e.status == 413 and "max_body_bytes=1048576" in e.message


@pytest.mark.parametrize("body, param", [
    ({"model": M}, "messages"),
    ({"model": M, "messages": []}, "messages"),
    ({"model": M, "messages": ["hi"]}, "messages[0]"),
    ({"model": M, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": M, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"model": M, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"model": M, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": M, "messages": [{"role": "user", "content": "x"}] * 300}, "messages"),
])
def test_bad_chat_requests_name_the_field(body, param):
    assert err(parse_chat, body, L, M).param == param


def test_unknown_model_is_404_and_bad_json_is_400():
    e = err(parse_chat, {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, L, M)
    assert (e.status, e.param, e.code) == (404, "model", "model_not_found")
    assert err(parse_body, b"{not json", L).code == "invalid_json"
    assert err(parse_body, b"[1, 2]", L).code == "invalid_json"


def test_limits_validate_themselves():
    with pytest.raises(ValueError, match="max_tokens_cap=0"):
        Limits(max_tokens_cap=0)
    with pytest.raises(ValueError, match="unknown limit"):
        Limits.from_any({"max_prompt": 3})
    assert Limits.from_any({"max_prompt_tokens": 64}).max_prompt_tokens == 64


def test_bearer_token():
    check_auth(None, None)  # no token configured: open
    check_auth("Bearer s3cret", "s3cret")
    for header in (None, "", "Bearer wrong", "Basic s3cret", "s3cret"):
        e = err(check_auth, header, "s3cret")
        assert e.status == 401 and e.type == "authentication_error"


def test_tenant_header():
    assert tenant_of(None, "acme") == "acme" and tenant_of("team-a.1") == "team-a.1"
    e = err(tenant_of, "../etc")
    assert e.param == TENANT_HEADER and e.status == 400


def test_responses_and_chunks_have_openai_shapes():
    r = parse_chat({"model": M, "messages": [{"role": "user", "content": "x"}]}, L, M)
    body = response(r, [("hello", "stop")], usage(10, 2, 8))
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "hello"
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                             "prompt_tokens_details": {"cached_tokens": 8}}
    first = chunk(r, 0, "", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunk(r, 0, "lo")["choices"][0]["delta"] == {"content": "lo"}
    assert chunk(r, 0, None, "length")["choices"][0] == {"index": 0, "finish_reason": "length", "logprobs": None, "delta": {}}
    last = chunk(r, -1, None, use=usage(1, 1, 0))
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 2
    c = parse_completion({"model": M, "prompt": "x"}, L, M)
    assert chunk(c, 0, "a")["choices"][0]["text"] == "a" and response(c, [("a", "length")], usage(1, 1, 0))["object"] == "text_completion"
    line = sse({"a": 1})
    assert line == b'data: {"a":1}\n\n' and json.loads(line[6:]) == {"a": 1} and DONE == b"data: [DONE]\n\n"


def test_stop_buffer_never_leaks_a_stop_sequence():
    s = StopBuffer(["END", "\n\n"])
    out = [s.feed(d) for d in ["Hel", "lo E", "N", "D more"]]
    assert "".join(out) == "Hello " and s.stopped and s.feed("x") == ""
    s = StopBuffer(["END"])
    assert s.feed("an E") == "an " and s.feed("gg") == "Egg" and s.flush() == "" and s.text == "an Egg"
    s = StopBuffer(["END"])
    assert s.feed("x E") == "x " and s.flush() == "E" and not s.stopped
    s = StopBuffer([])
    assert s.feed("abc") == "abc" and s.flush() == ""


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="ab\nEND", max_size=40), stops=st.lists(st.text(alphabet="ab\nEND", min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=8))
def test_stop_buffer_matches_cutting_the_whole_text(text, stops, cuts):
    pieces, prev = [], 0
    for c in sorted(set(cuts)) + [len(text)]:
        pieces.append(text[prev:max(prev, c)])
        prev = max(prev, c)
    s = StopBuffer(stops)
    got = "".join(s.feed(p) for p in pieces) + s.flush()
    # oracle: the first position (in arrival order) where some stop sequence is complete
    ends = [e for e in range(len(text) + 1) if any(text[:e].endswith(x) for x in stops)]
    if ends:
        e = ends[0]
        start = min(e - len(x) for x in stops if text[:e].endswith(x))
        assert got == text[:start] and s.stopped
    else:
        assert got == text and not s.stopped


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(
        ["model", "prompt", "messages", "max_tokens", "temperature", "stop", "stream", "n", "top_p", "seed"]), c, max_size=6),
    max_leaves=12).map(lambda v: json.dumps(v).encode())))
def test_random_bodies_get_a_clear_error_or_a_valid_request(raw):
    for parse in (parse_completion, parse_chat):
        try:
            r = parse(parse_body(raw, L), L, "")
        except APIError as e:
            assert 400 <= e.status < 500 and e.body()["error"]["message"]
        else:
            assert 1 <= r.sampling.max_tokens <= L.max_tokens_cap and (r.prompts or r.messages)
