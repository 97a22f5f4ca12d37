"""Gateway pieces without processes: configuration checks, the request parser (with a
hypothesis property test), the SSE parser's linear cost and the metric label guard."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harp_vllm.errors import UserError
from harp_vllm.gateway.config import API_KEYS_ENV, build_config, redact_url
from harp_vllm.gateway.openai_errors import GatewayError, status_label
from harp_vllm.gateway.prometheus_metrics import GatewayMetrics
from harp_vllm.gateway.relay import Recorder, SSERelay, TooLarge
from harp_vllm.gateway.schemas import RequestLimits, count_items, parse_request

B = ["a=http://127.0.0.1:8001"]


def config_file(tmp_path, data: dict):
    path = tmp_path / "gw.json"
    path.write_text(json.dumps(data))
    return path


def refused(match: str, **kw) -> str:
    with pytest.raises(UserError, match=match) as e:
        build_config(**kw)
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# Configuration (issue 14, items 1 and 2)
# ---------------------------------------------------------------------------------------------
def test_api_keys_string_instead_of_list_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    path = config_file(tmp_path, {"backends": [{"name": "a", "url": "http://h:1"}],
                                  "api_keys": "sk-secret"})
    msg = refused(r"api_keys: must be a list, not str", config_file=path)
    assert "sk-secret" not in msg


@pytest.mark.parametrize("keys, where", [([""], "api_keys\\[0\\] is empty"),
                                         (["ok-key", " "], "api_keys\\[1\\]"),
                                         (["sk-x "], "whitespace"),
                                         (["sk x"], "spaces"),
                                         ([5], "must be a string")])
def test_empty_or_blank_keys_in_a_file_are_refused(tmp_path, monkeypatch, keys, where):
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    path = config_file(tmp_path, {"backends": [{"name": "a", "url": "http://h:1"}],
                                  "api_keys": keys})
    msg = refused(where, config_file=path)
    assert "sk x" not in msg and "sk-x " not in msg


def test_empty_key_flag_and_env_are_refused(monkeypatch):
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    refused("--api-key #1 is empty", backends=B, api_keys=[""])
    monkeypatch.setenv(API_KEYS_ENV, "sk-good,,sk-other")
    refused(f"\\${API_KEYS_ENV} entry 2 is empty", backends=B)
    monkeypatch.setenv(API_KEYS_ENV, " sk-good , sk-other ")
    assert build_config(backends=B).api_keys == ["sk-good", "sk-other"]


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:99999", "(?i)port"), ("http://:8000", "no host"),
    ("ftp://h:21", "http:// or https://"), ("127.0.0.1:8000", "http:// or https://"),
    ("http://h:80/?x=1", "query"), ("http://h:abc", "not a valid URL")])
def test_bad_backend_urls_are_refused_at_start(url, why):
    refused(why, backends=[f"a={url}"])


def test_url_credentials_are_used_but_never_shown(tmp_path):
    cfg = build_config(backends=["a=http://admin:s3cret-pass@127.0.0.1:8001/v1/"],
                       allow_no_auth=True)
    b = cfg.backends[0]
    assert b.base_url == "http://127.0.0.1:8001"
    assert b.auth_header() == "Basic YWRtaW46czNjcmV0LXBhc3M="  # admin:s3cret-pass
    assert "s3cret" not in b.shown_url and "admin" not in b.shown_url
    msg = refused("(?i)port", backends=["a=http://admin:s3cret-pass@127.0.0.1:99999"])
    assert "s3cret" not in msg
    assert redact_url("https://u:p@h/x") == "https://***@h/x"
    path = config_file(tmp_path, {"backends": [{"name": "a", "url": "http://u:p@h:1",
                                                "api_key": "sk-up"}]})
    refused("either credentials in the url or api_key", config_file=path)


@pytest.mark.parametrize("flag, why", [
    ("s=a:inf,b:1", "targets.0.weight: Input should be a finite number$"),
    ("s=a:nan", "targets.0.weight: Input should be a finite number$"),
    ("s=a:0", "targets.0.weight: Input should be greater than 0$"),
    ("s=a:-1", "targets.0.weight: Input should be greater than 0$"),
    ("s=b:1,a:1e308,c:1e308", "aliases.0: alias 's': the weights' sum is not finite$")])
def test_weights_must_be_finite_and_positive(flag, why):
    """Each input is refused for its own reason (the message names the setting and says
    why), and the same weights are accepted when finite and positive."""
    hosts = ["a=http://h:1", "b=http://h:2", "c=http://h:3"]
    refused(why, backends=hosts, aliases=[flag], allow_no_auth=True)
    ok = build_config(backends=hosts, aliases=["s=a:1e300,b:0.5"], allow_no_auth=True)
    assert [t.weight for t in ok.aliases[0].targets] == [1e300, 0.5]


def test_types_are_strict(tmp_path):
    base = {"backends": [{"name": "a", "url": "http://h:1"}]}
    for extra, where in (({"max_connections": "4"}, "max_connections"),
                         ({"protect_metrics": "yes"}, "protect_metrics"),
                         ({"backends": {"name": "a", "url": "http://h:1"}}, "backends: must be"),
                         ({"request_timeout": float("inf")}, "request_timeout"),
                         ({"protect_metrics": True}, "needs at least one API key")):
        refused(where, config_file=config_file(tmp_path, {**base, **extra}))


# ---------------------------------------------------------------------------------------------
# The request parser
# ---------------------------------------------------------------------------------------------
LIMITS = RequestLimits(max_tokens=1000, n=4, best_of=4, max_depth=16)


def status_of(raw: bytes, endpoint: str = "completions") -> int:
    try:
        parse_request(raw, endpoint, LIMITS)
    except GatewayError as e:
        return e.status
    return 200


@pytest.mark.parametrize("raw", [
    b'{"model": "m", "prompt": NaN}', b'{"model": "m", "prompt": "x", "temperature": Infinity}',
    b'{"model": "m", "prompt": -Infinity}', b'{"model": "m", "prompt": "\\ud800"}',
    b'{"model": "m", "prompt": ["ok", "\\uDFFF x"]}', b'{"\\udc00": 1, "model": "m"}',
    b'[' * 1000 + b']' * 1000, b'{"model": "m", "prompt": ' + b'[' * 40 + b']' * 40 + b'}',
    b'\xff\xfe\x00', b'{"model": "m", "prompt": "x"', b'"just a string"'])
def test_non_strict_json_is_a_400(raw):
    assert status_of(raw) == 400


def test_valid_surrogate_pairs_pass():
    body = parse_request(b'{"model": "m", "prompt": "\\ud83d\\ude00"}', "completions", LIMITS)
    assert body["prompt"] == "\U0001F600"


@pytest.mark.parametrize("field, value, status", [
    ("max_tokens", 1000, 200), ("max_tokens", 1001, 400), ("max_completion_tokens", 1001, 400),
    ("n", 4, 200), ("n", 5, 400), ("n", 0, 422), ("best_of", 5, 400), ("max_tokens", True, 422),
    ("max_tokens", 2.0, 422), ("temperature", "hot", 422), ("top_p", 1.5, 422)])
def test_caps_and_types(field, value, status):
    assert status_of(json.dumps({"model": "m", "prompt": "x", field: value}).encode()) == status


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)
fields = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.text(), json_values), "prompt": json_values,
    "messages": st.lists(st.one_of(json_values, st.fixed_dictionaries(
        {"role": json_values}, optional={"content": json_values})), max_size=3),
    "stream": json_values, "stream_options": json_values, "max_tokens": json_values,
    "n": json_values, "best_of": json_values, "temperature": json_values, "stop": json_values})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(fields, json_values), endpoint=st.sampled_from(
    ["completions", "chat/completions"]))
def test_parser_property_any_json(body, endpoint):
    """Any JSON document is either accepted (with a usable model and stream flag) or refused
    with a 4xx GatewayError; nothing else can escape."""
    raw = json.dumps(body).encode()
    try:
        out = parse_request(raw, endpoint, LIMITS)
    except GatewayError as e:
        assert e.status in (400, 422) and e.message
        return
    assert isinstance(out["model"], str) and out["model"]
    assert out.get("stream") in (None, True, False)
    json.dumps(out, allow_nan=False).encode()  # what the gateway sends on is valid JSON


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_parser_property_any_bytes(raw):
    assert status_of(raw) in (200, 400, 422)


# ---------------------------------------------------------------------------------------------
# SSE parsing and metric labels
# ---------------------------------------------------------------------------------------------
class CountingBuffer(bytearray):
    """A bytearray that counts the bytes its ``find`` calls examine."""

    scanned = 0

    def find(self, sub, start=0, *rest):  # type: ignore[override]
        i = super().find(sub, start, *rest)
        CountingBuffer.scanned += (i + len(sub) if i >= 0 else len(self)) - start
        return i


def relay(max_event: int = 64 << 20) -> SSERelay:
    return SSERelay(Recorder(GatewayMetrics(), "b", "m", "primary", 0.0), True, max_event)


def test_sse_parsing_is_linear_in_the_event_size():
    """A 4 MB event arriving in 4 KB pieces is scanned about once (the old parser rescanned
    the whole buffer on every piece: ~2 GB of scanning for this event)."""
    r = relay()
    r.buf = CountingBuffer()
    CountingBuffer.scanned = 0
    event = b'data: {"choices": [], "pad": "' + b"x" * (4 << 20) + b'"}\n\n'
    out = []
    for i in range(0, len(event), 4096):
        out += r.feed(event[i:i + 4096])
    assert out == [event]
    # Every byte is looked at (so the count measures the parser's scanning, not a parser
    # that stopped calling find), and at most about once.
    assert len(event) - 2 <= CountingBuffer.scanned < 2 * len(event), CountingBuffer.scanned


def test_sse_events_split_anywhere_and_crlf():
    text = (b'data: {"choices": [{"text": "a"}]}\r\n\r\n: comment\n\n'
            b'data: {"choices": [], "usage": {"prompt_tokens": 3}}\n\ndata: [DONE]\n\n')
    for step in (1, 3, 7, len(text)):
        r = relay()
        out = []
        for i in range(0, len(text), step):
            out += r.feed(text[i:i + step])
        assert [e.split(b"\n")[0][:12] for e in out] == [b'data: {"choi', b": comment",
                                                          b'data: {"choi', b"data: [DONE]"]
        assert r.saw_done and r.rec.usage == {"prompt_tokens": 3} and r.rec.first is not None


def test_sse_event_over_the_cap_is_refused():
    r = relay(max_event=1000)
    r.feed(b"data: " + b"x" * 900)
    with pytest.raises(TooLarge):
        r.feed(b"x" * 200)
    with pytest.raises(TooLarge):  # a whole oversized event in one piece (found by the soak)
        relay(max_event=1000).feed(b"data: " + b"x" * 2000 + b"\n\n")
    assert relay(max_event=1000).feed(b"data: " + b"x" * 900 + b"\n\n")


def test_status_labels_are_bounded():
    assert [status_label(s) for s in (200, 503, 999999, -1, "500", True, None, 99)] == [
        "200", "503", "other", "other", "other", "other", "other", "other"]


# ---------------------------------------------------------------------------------------------
# Issue 26: the parser's new refusals, the value count, URLs and keys
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, status", [
    ('{"model": "m", "prompt": "é"}'.encode("utf-16"), 400),
    ('{"model": "m", "prompt": "x"}'.encode("utf-16-le"), 400),
    ('{"model": "m", "prompt": "x"}'.encode("utf-32"), 400),
    (b'\xef\xbb\xbf{"model": "m", "prompt": "x"}', 400),            # UTF-8 BOM
    (b'{"model": "m", "prompt": "\xed\xa0\x80"}', 400),              # a raw UTF-8 surrogate
    (b'{"model": "m", "prompt": "x", "temperature": 1e999}', 400),
    (b'{"model": "m", "prompt": "x", "top_p": -1e400}', 400),
    (b'{"model": "m", "prompt": "x", "temperature": 1e308}', 200),
    ('{"model": "m", "prompt": "é"}'.encode(), 200)])
def test_only_utf8_and_finite_numbers(raw, status):
    assert status_of(raw) == status


def test_json_values_are_counted_before_parsing():
    limits = RequestLimits(max_items=1000)
    lists = b'{"model": "m", "prompt": [' + b",".join([b"[]"] * 1001) + b"]}"
    with pytest.raises(GatewayError) as e:
        parse_request(lists, "completions", limits)
    assert e.value.status == 413 and e.value.code == "request_too_large"
    # Commas and brackets inside strings (escaped quotes included) are not values.
    text = json.dumps({"model": "m", "prompt": 'a, [b] {c} \\" ,' * 2000}).encode()
    assert parse_request(text, "completions", limits)["prompt"].startswith("a, [b]")
    assert count_items(text.decode(), 1000) == 2  # the outer { and the comma after "m"
    many_strings = b'{"model": "m", "prompt": [' + b",".join([b'""'] * 1001) + b"]}"
    assert status_of(many_strings) == 200  # LIMITS allow 100,000
    with pytest.raises(GatewayError):
        parse_request(many_strings, "completions", limits)
    ok = b'{"model": "m", "prompt": [' + b",".join([b"1"] * 990) + b"]}"
    assert len(parse_request(ok, "completions", limits)["prompt"]) == 990


def test_passwords_with_slashes_are_never_shown(monkeypatch):
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    for url in ("http://admin:pa/ss-secret@127.0.0.1:1", "http://admin:pa?ss-secret@h:1",
                "http://admin:pa#ss-secret@h:80/v1"):
        msg = refused("not a valid URL|percent-encode", backends=[f"a={url}"],
                      allow_no_auth=True)
        assert "ss-secret" not in msg and "pa" not in msg.replace("password", ""), msg
    assert redact_url("http://u:p/w@h:1/x") == "http://***@h:1/x"


def test_no_key_needs_allow_no_auth(monkeypatch):
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    refused("no API key: give --api-key.*--allow-no-auth", backends=B)
    assert build_config(backends=B, allow_no_auth=True).api_keys == []
    assert build_config(backends=B, api_keys=["sk-k"]).allow_no_auth is False
