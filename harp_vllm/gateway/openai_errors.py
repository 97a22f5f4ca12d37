"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json

from starlette.responses import JSONResponse

CLIENT_CLOSED = 499  # nginx's "client closed request"; only ever a metric label

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "invalid_request_error", 405: "invalid_request_error",
               408: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 431: "invalid_request_error",
               500: "api_error", 502: "api_error", 503: "api_error", 504: "api_error"}


def error_payload(status: int, message: str, code: str | None = None,
                  param: str | None = None, type_: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or ERROR_TYPES.get(status, "api_error"),
                      "param": param, "code": code}}


class GatewayError(Exception):
    """An error answered to the caller as OpenAI-style JSON with ``status``."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    def response(self, extra_headers: dict[str, str] | None = None) -> JSONResponse:
        headers = {**(extra_headers or {}), **(self.headers or {})}
        return JSONResponse(error_payload(self.status, self.message, self.code, self.param),
                            status_code=self.status, headers=headers or None)


class ClientGone(Exception):
    """The caller disconnected while the gateway was still working on its request."""


def loads_reply(content: bytes | str) -> object:
    """A backend's JSON, parsed: :class:`ValueError` for anything that is not JSON, including
    nesting too deep for the parser (``RecursionError``)."""
    try:
        return json.loads(content)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def sse_error(status: int, message: str, code: str) -> bytes:
    """An SSE ``data:`` event carrying an OpenAI-style error (ends a broken stream)."""
    return b"data: " + json.dumps(error_payload(status, message, code)).encode() + b"\n\n"


def status_label(status: object) -> str:
    """A bounded metric label for an HTTP status from anywhere (a backend's SSE error code is
    arbitrary JSON): ``"100"``..``"599"`` or ``"other"``."""
    if isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599:
        return str(status)
    return "other"
