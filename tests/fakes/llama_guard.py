"""A scripted Llama Guard–style classifier behind the OpenAI chat route.

``POST /v1/chat/completions``: reads the conversation between ``<BEGIN CONVERSATION>``
and ``<END CONVERSATION>`` of the (single) user message and answers ``unsafe\\nS9`` when
it contains the word ``kaboom``, ``unsafe\\nS10`` for ``hateful``, ``safe`` otherwise
(case-insensitive). ``requests`` records every prompt it was asked.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fakes.server import FakeServer

RULES = (("kaboom", "unsafe\nS9"), ("hateful", "unsafe\nS10"))


def verdict(prompt: str) -> str:
    """The classifier's answer to a Llama Guard prompt."""
    conv = prompt.split("<BEGIN CONVERSATION>")[-1].split("<END CONVERSATION>")[0].lower()
    for word, answer in RULES:
        if word in conv:
            return answer
    return "safe"


def fake() -> FakeServer:
    """The classifier (not started)."""
    server: FakeServer

    async def chat(request: Request) -> Response:
        rec = await server.record(request)
        body = json.loads(rec.body)
        answer = verdict(str(body["messages"][-1]["content"]))
        return JSONResponse({
            "id": "chatcmpl-guard", "object": "chat.completion", "created": 0,
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 3, "total_tokens": 103}})

    server = FakeServer([Route("/v1/chat/completions", chat, methods=["POST"])])
    return server
