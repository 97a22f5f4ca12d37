"""A tiny OpenAI-compatible stand-in for a vLLM server (gateway tests and demos).

``python tests/fake_backend.py --port 8009 --model fake --token-delay 0.01``

It answers ``/health``, ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``
(streamed or not, with ``usage``; the prompt "tokens" are whitespace-separated words) and
``/stats`` (requests seen, finished, and streams cancelled because the client went away).
Test hooks in the request body: ``fake_token_delay`` (seconds per token),
``fake_die_after`` (the process exits after streaming that many tokens, like a crashed server),
``fake_status`` (answer with that HTTP error status), ``fake_linger`` (seconds the stream stays
open after ``[DONE]``, as a server may before closing the connection). Faults for the
gateway's limits and soak tests: ``fake_drop_after`` (the stream breaks off after that many
tokens, the process lives on), ``fake_garbage`` (a 200 reply that is not JSON),
``fake_reply_bytes`` (a non-streamed reply padded to about that many bytes),
``fake_event_bytes`` (one SSE event of about that many bytes), ``fake_sse_error_code`` (the
stream ends with an error event carrying that code), ``fake_trickle`` (a non-streamed reply
sent one byte every that many seconds), ``fake_deep_reply`` (a 200 reply of that many nested
``[``, valid JSON too deep for a parser), ``fake_text_status`` (that error status with a
text/plain body naming an internal host and path, like a proxy's error page),
``fake_token_pad`` (every streamed token event padded with that many bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


def create_fake_app(model: str = "fake", token_delay: float = 0.0) -> FastAPI:
    app = FastAPI()
    stats = {"requests": 0, "finished": 0, "cancelled": 0, "inflight": 0}

    @app.get("/health")
    async def health():
        return JSONResponse({})

    @app.get("/stats")
    async def get_stats():
        return stats

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model",
                                            "created": 0, "owned_by": "fake"}]}

    async def generate(request: Request, chat: bool):
        stats["requests"] += 1
        body = await request.json()
        if body.get("model") != model:
            return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does "
                                           "not exist.", "type": "NotFoundError", "param": None,
                                           "code": 404}}, status_code=404)
        fault = await _fault(body)
        if fault is not None:
            return fault
        if body.get("fake_status"):
            return JSONResponse({"error": {"message": "fake failure", "type": "fake",
                                           "param": None, "code": body["fake_status"]}},
                                status_code=int(body["fake_status"]))
        if chat:
            text = " ".join(str(m.get("content") or "") for m in body.get("messages", []))
        else:
            p = body.get("prompt", "")
            text = p if isinstance(p, str) else " ".join(map(str, p))
        n_prompt = len(text.split())
        n_out = int(body.get("max_tokens") or 16)
        delay = float(body.get("fake_token_delay", token_delay))
        die_after = body.get("fake_die_after")
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                 "total_tokens": n_prompt + n_out}
        rid, created = f"fake-{stats['requests']}", int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def choice(tok: str, final: bool, stream: bool) -> dict:
            c = {"index": 0, "finish_reason": "length" if final else None}
            if chat:
                c["delta" if stream else "message"] = {"role": "assistant", "content": tok}
            else:
                c["text"] = tok
            return c

        if not body.get("stream"):
            stats["inflight"] += 1
            try:
                await asyncio.sleep(delay * n_out)
            finally:
                stats["inflight"] -= 1
            if die_after is not None:
                os._exit(1)
            stats["finished"] += 1
            return {"id": rid, "object": obj, "created": created, "model": model,
                    "choices": [choice(" tok" * n_out, True, False)], "usage": usage}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events():
            stats["inflight"] += 1
            try:
                if body.get("fake_event_bytes"):
                    pad = "x" * int(body["fake_event_bytes"])
                    yield f'data: {{"choices": [], "pad": "{pad}"}}\n\n'
                for i in range(n_out):
                    if die_after is not None and i >= int(die_after):
                        os._exit(1)
                    if body.get("fake_drop_after") is not None and i >= body["fake_drop_after"]:
                        raise ConnectionAbortedError("fake_drop_after")
                    await asyncio.sleep(delay)
                    chunk = {"id": rid, "object": obj + ".chunk", "created": created,
                             "model": model, "choices": [choice(" tok", i == n_out - 1, True)]}
                    if body.get("fake_token_pad"):
                        chunk["pad"] = "x" * int(body["fake_token_pad"])
                    yield f"data: {json.dumps(chunk)}\n\n"
                if body.get("fake_sse_error_code") is not None:
                    err = {"error": {"message": "fake", "type": "fake", "param": None,
                                     "code": body["fake_sse_error_code"]}}
                    yield f"data: {json.dumps(err)}\n\n"
                    return
                if include_usage:
                    last = {"id": rid, "object": obj + ".chunk", "model": model,
                            "choices": [], "usage": usage}
                    yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
                stats["finished"] += 1
                await asyncio.sleep(float(body.get("fake_linger", 0.0)))
            except (asyncio.CancelledError, GeneratorExit):
                stats["cancelled"] += 1
                raise
            finally:
                stats["inflight"] -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    return app


async def _fault(body: dict):
    """A reply for the fault hooks that replace the whole answer, else None."""
    if body.get("fake_deep_reply"):
        n = int(body["fake_deep_reply"])
        return PlainTextResponse("[" * n + "]" * n, media_type="application/json")
    if body.get("fake_text_status"):
        return PlainTextResponse("upstream 10.1.2.3:8000 failed: /srv/internal/secret.py line 3",
                                 status_code=int(body["fake_text_status"]))
    if body.get("fake_garbage"):
        return PlainTextResponse("<html>not json</html>", status_code=200)
    if body.get("fake_reply_bytes"):
        return JSONResponse({"choices": [], "pad": "x" * int(body["fake_reply_bytes"])})
    if body.get("fake_trickle"):
        async def trickle():
            for ch in '{"choices": [], "usage": null}':
                yield ch.encode()
                await asyncio.sleep(float(body["fake_trickle"]))
        return StreamingResponse(trickle(), media_type="application/json")
    return None


def main() -> None:  # pragma: no cover - a separate process in tests
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="fake")
    ap.add_argument("--token-delay", type=float, default=0.0)
    a = ap.parse_args()
    uvicorn.run(create_fake_app(a.model, a.token_delay), host=a.host, port=a.port,
                log_level="warning")


if __name__ == "__main__":  # pragma: no cover
    main()
