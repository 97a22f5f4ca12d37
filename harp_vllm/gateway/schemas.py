"""Parse and check a completion request body, once, without a model layer.

The gateway reads ``model``, ``stream`` and ``stream_options`` and enforces the configured
caps on ``max_tokens``/``max_completion_tokens``/``n``/``best_of``; it also checks the types of
the common OpenAI fields so a caller learns about a typo from the gateway, with the same
message whichever backend would have answered. Other fields pass through untouched (the
backend validates them). JSON must be strict: UTF-8 (RFC 8259; no BOM, no UTF-16/32), no
``NaN``/``Infinity`` and no number too large for a float (``1e999``), no lone surrogates,
nesting at most ``max_depth`` deep. Every problem is a :class:`GatewayError` (400/413/422).

The parse runs on the event loop, so its cost is bounded instead of moved to a thread: the
standard C JSON parser never releases the GIL, so a worker thread would stall the loop just
the same (and a process would have to ship the parsed body back, costing as much as the
parse). Before parsing, :func:`count_items` counts the body's JSON items with C-speed byte
counts: the ``,`` ``[`` ``{`` outside strings, about one per value (an empty list counts
twice, an object member once); a body with more than ``max_items`` is refused with 413
without being parsed. The parse, the checks and a re-serialisation are then linear in at
most ``2 * max_items + 1`` values (``benchmarks/bench_gateway_attacks.py`` measures
``/live`` meanwhile; a 4 MiB body of plain text is a handful of items).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .openai_errors import GatewayError

_SURROGATE = re.compile(r"\\u[dD][89abcdefABCDEF]")


@dataclass(frozen=True)
class RequestLimits:
    max_tokens: int = 32768
    n: int = 16
    best_of: int = 16
    max_depth: int = 32
    max_items: int = 100_000


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large for a float")
    return value


def count_items(text: str, limit: int) -> int:
    """The JSON items in ``text`` (its ``,`` ``[`` ``{`` outside strings), or a number over
    ``limit`` when there are more. Every value but the first of its array or object follows
    one of them, so twice the count plus one bounds the values.

    The first count includes those inside strings; only when it is over ``limit`` are the
    strings taken out (escapes dropped, then split at the quotes), and with over
    ``2 * limit + 2`` quotes there are over ``limit`` strings anyway. Every step is a C-speed
    scan; on text that is not JSON the result still bounds what the parser reads before it
    stops.
    """
    n = text.count(",") + text.count("[") + text.count("{")
    if n <= limit:
        return n
    plain = text.replace("\\\\", "").replace('\\"', "")
    if plain.count('"') > 2 * limit + 2:
        return plain.count('"') // 2
    outside = "".join(plain.split('"')[::2])
    return outside.count(",") + outside.count("[") + outside.count("{")


def _scan(obj: Any, max_depth: int, check_strings: bool) -> None:
    """Raise ValueError if ``obj`` nests deeper than ``max_depth`` or (when ``check_strings``)
    holds a string that is not valid Unicode (a lone surrogate)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise ValueError(f"the JSON nests deeper than {max_depth} levels")
        if isinstance(node, dict):
            items: Any = node.values()
            if check_strings:
                for k in node:
                    k.encode()
        elif isinstance(node, list):
            items = node
        else:
            if check_strings and isinstance(node, str):
                node.encode()
            continue
        for v in items:
            if isinstance(v, dict | list):
                stack.append((v, depth + 1))
            elif check_strings and isinstance(v, str):
                v.encode()


def load_json(raw: bytes, max_depth: int, max_items: int = 100_000) -> dict:
    """The body as a JSON object, strictly (see the module docstring)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GatewayError(400, "We could not parse the JSON body of your request: it is not "
                                f"UTF-8 (byte {e.start}); JSON must be UTF-8 (RFC 8259)",
                           "invalid_json") from None
    if "\x00" in text:  # never in JSON text (a string holds it escaped): UTF-16 or -32
        raise GatewayError(400, "We could not parse the JSON body of your request: it holds "
                                "NUL bytes (UTF-16 or UTF-32?); JSON must be UTF-8 (RFC 8259)",
                           "invalid_json")
    items = count_items(text, max_items)
    if items > max_items:
        raise GatewayError(413, f"the request body holds more than {max_items} JSON items "
                                "(values in arrays and objects)", "request_too_large")
    try:
        obj = json.loads(text, parse_constant=_no_constants, parse_float=_finite_float)
        # A lone surrogate can only come from a \\uD800-\\uDFFF escape; the depth can only
        # pass max_depth with that many brackets.
        surrogates = _SURROGATE.search(text) is not None
        if surrogates or text.count("[") + text.count("{") > max_depth:
            _scan(obj, max_depth, surrogates)
    except UnicodeEncodeError:
        raise GatewayError(400, "We could not parse the JSON body of your request: it holds a "
                                "lone UTF-16 surrogate escape (not valid Unicode)",
                           "invalid_json") from None
    except (ValueError, RecursionError) as e:
        raise GatewayError(400, f"We could not parse the JSON body of your request: {e}",
                           "invalid_json") from None
    if not isinstance(obj, dict):
        raise GatewayError(400, "The request body must be a JSON object", "invalid_json")
    return obj


def _shown(v: Any) -> str:
    if isinstance(v, str | int | float | bool) or v is None:
        return json.dumps(v)[:80]
    return type(v).__name__


def _bad(param: str, what: str, got: Any) -> GatewayError:
    return GatewayError(422, f"Invalid value for '{param}': {what} (got {_shown(got)})",
                        "invalid_type", param)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_int(body: dict, name: str, low: int, cap: int | None) -> None:
    v = body.get(name)
    if v is None:
        return
    if not _is_int(v):
        raise _bad(name, "Input should be a valid integer", v)
    if v < low:
        raise _bad(name, f"Input should be greater than or equal to {low}", v)
    if cap is not None and v > cap:
        raise GatewayError(400, f"'{name}' is {v}; this gateway allows at most {cap}",
                           "limit_exceeded", name)


def _check_num(body: dict, name: str, low: float | None = None, high: float | None = None
               ) -> None:
    v = body.get(name)
    if v is None:
        return
    if not _is_num(v):
        raise _bad(name, "Input should be a valid number", v)
    if (low is not None and v < low) or (high is not None and v > high):
        raise _bad(name, f"Input should be between {low} and {high}", v)


def _check_type(body: dict, name: str, types: type | tuple[type, ...], what: str) -> None:
    v = body.get(name)
    if v is not None and not isinstance(v, types):
        raise _bad(name, f"Input should be {what}", v)


def _check_common(body: dict, limits: RequestLimits) -> None:
    model = body.get("model")
    if model is None:
        raise GatewayError(422, "'model' is a required property", "missing_required_parameter",
                           "model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "Input should be a non-empty string", model)
    _check_type(body, "stream", bool, "a valid boolean")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad("stream_options", "Input should be an object", opts)
        for k in ("include_usage", "continuous_usage_stats"):
            if opts.get(k) is not None and not isinstance(opts[k], bool):
                raise _bad(f"stream_options.{k}", "Input should be a valid boolean", opts[k])
    _check_int(body, "max_tokens", 0, limits.max_tokens)
    _check_int(body, "max_completion_tokens", 0, limits.max_tokens)
    _check_int(body, "n", 1, limits.n)
    _check_int(body, "best_of", 1, limits.best_of)
    _check_num(body, "temperature", 0)
    _check_num(body, "top_p", 0, 1)
    _check_num(body, "presence_penalty")
    _check_num(body, "frequency_penalty")
    if body.get("seed") is not None and not _is_int(body["seed"]):
        raise _bad("seed", "Input should be a valid integer", body["seed"])
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _bad("stop", "Input should be a string or a list of strings", stop)
    _check_type(body, "user", str, "a valid string")


def _check_prompt(body: dict) -> None:
    if "prompt" not in body:
        raise GatewayError(422, "'prompt' is a required property", "missing_required_parameter",
                           "prompt")
    p = body["prompt"]
    ok = isinstance(p, str) or (isinstance(p, list) and p and (
        all(isinstance(x, str) for x in p) or all(_is_int(x) for x in p)
        or all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p)))
    if not ok:
        raise _bad("prompt", "Input should be a string, a list of strings, a list of token ids "
                             "or a list of token-id lists (lists non-empty)", p)


def _check_messages(body: dict) -> None:
    if "messages" not in body:
        raise GatewayError(422, "'messages' is a required property",
                           "missing_required_parameter", "messages")
    msgs = body["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "Input should be a non-empty list", msgs)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages.{i}", "Input should be an object", m)
        role = m.get("role")
        if role is None:
            raise GatewayError(422, f"'messages.{i}.role' is a required property",
                               "missing_required_parameter", f"messages.{i}.role")
        if not isinstance(role, str) or not role:
            raise _bad(f"messages.{i}.role", "Input should be a non-empty string", role)
        content = m.get("content")
        if content is not None and not isinstance(content, str) and not (
                isinstance(content, list) and all(isinstance(c, dict) for c in content)):
            raise _bad(f"messages.{i}.content", "Input should be a string or a list of "
                                                "content parts", content)


def parse_request(raw: bytes, endpoint: str, limits: RequestLimits) -> dict:
    """The checked request body of ``POST /v1/<endpoint>`` (see the module docstring)."""
    body = load_json(raw, limits.max_depth, limits.max_items)
    _check_common(body, limits)
    if endpoint == "completions":
        _check_prompt(body)
    else:
        _check_messages(body)
    return body
