"""A fast fake OpenAI-compatible upstream for the gateway benchmark (bench_gateway.py).

Run::

    .venv/bin/python bench/fake_upstream.py --port 18000

``POST /v1/chat/completions`` (also ``/chat/completions``) answers a fixed small chat
completion (``application/json``); with ``"stream": true`` it answers ``text/event-stream``
with ``STREAM_CHUNKS`` content deltas, a final chunk with ``finish_reason`` and ``usage``,
and ``data: [DONE]`` — all written at once, chunked transfer encoding, no delays.
``GET /v1/models`` lists the one model; anything else is 404. HTTP/1.1 keep-alive.

Raw asyncio protocol + httptools parser on uvloop (both ship with ``uvicorn[standard]``),
so the upstream's own latency is tens of microseconds and it is never the bottleneck;
the benchmark measures it directly and subtracts it.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import httptools

MODEL = "gpt-4o-mini"
STREAM_CHUNKS = 8

_COMPLETION = {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": MODEL,
    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                 "message": {"role": "assistant", "content": "Hello! How can I help you today?",
                             "refusal": None}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
    "system_fingerprint": "fp_bench",
}


def _chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:  # type: ignore[type-arg]
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
            "model": MODEL, "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _stream_body() -> bytes:
    words = ["Hello", "!", " How", " can", " I", " help", " you", " today?"][:STREAM_CHUNKS]
    events = [_chunk({"role": "assistant", "content": ""})]
    events += [_chunk({"content": w}) for w in words]
    events.append(_chunk({}, "stop", {"prompt_tokens": 12, "completion_tokens": len(words),
                                      "total_tokens": 12 + len(words)}))
    events.append(b"data: [DONE]\n\n")
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


def _response(status: bytes, ctype: bytes, body: bytes, chunked: bool = False) -> bytes:
    length = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(body)
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\n" + length
            + b"\r\nConnection: keep-alive\r\nx-request-id: bench\r\n\r\n" + body)


_JSON = _response(b"200 OK", b"application/json",
                  json.dumps(_COMPLETION, separators=(",", ":")).encode())
_SSE = _response(b"200 OK", b"text/event-stream", _stream_body(), chunked=True)
_MODELS = _response(b"200 OK", b"application/json", json.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                 "owned_by": "bench"}]}).encode())
_NOT_FOUND = _response(b"404 Not Found", b"application/json",
                       b'{"error":{"message":"not found","type":"invalid_request_error"}}')
_BAD = _response(b"400 Bad Request", b"application/json",
                 b'{"error":{"message":"bad JSON body","type":"invalid_request_error"}}')


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        path = self.url.split(b"?", 1)[0]
        method = self.parser.get_method()
        if method == b"POST" and path in (b"/v1/chat/completions", b"/chat/completions"):
            try:
                req = json.loads(b"".join(self.body))
            except ValueError:
                self.transport.write(_BAD)
                return
            self.transport.write(_SSE if req.get("stream") else _JSON)
        elif method == b"GET" and path in (b"/v1/models", b"/models"):
            self.transport.write(_MODELS)
        else:
            self.transport.write(_NOT_FOUND)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Conn, host, port, backlog=1024, reuse_address=True)
    print(f"fake upstream on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18000)
    args = ap.parse_args()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
