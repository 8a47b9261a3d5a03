"""Fake Google: the Gemini API, Vertex AI and the OAuth token endpoint, on ``brain.think``.

* ``POST /v1beta/models/{model}:{generateContent|streamGenerateContent|batchEmbedContents}``
  with ``x-goog-api-key`` (else 400 ``API key not valid``, as Gemini answers);
* ``POST /v1/projects/{p}/locations/{r}/publishers/google/models/{model}:{...|predict}``
  with ``Authorization: Bearer <token from /token>`` (else 401 ``UNAUTHENTICATED``);
* ``POST /token``: the JWT bearer grant; the assertion's RS256 signature is verified with
  the public half of :data:`KEY` and its claims checked (iss, scope, aud, one hour).

Like Gemini 3, it answers 400 when a ``model`` turn replays a ``functionCall`` without
the ``thoughtSignature`` it issued for it (and for any signature it never issued), so
tests prove signatures survive round trips. Errors use Google's body
``{"error": {"code", "message", "status"}}``; 429 is ``RESOURCE_EXHAUSTED`` with a
``google.rpc.RetryInfo`` detail (``retryDelay: "6.2s"``) and, as at Google, no
``Retry-After`` header.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fakes.brain import Seen, instance, pieces, think
from fakes.server import FakeServer, sleep_forever

API_KEY = "AIzaFAKE-gemini-key-7f3a9c2e1b"
PROJECT = "fmserve-test-project"
REGION = "us-central1"
CLIENT_EMAIL = "fmserve@fmserve-test-project.iam.gserviceaccount.com"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PEM = KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption()).decode()
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
          429: "RESOURCE_EXHAUSTED", 500: "INTERNAL"}
FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP"}


def service_account_json(token_uri: str = "https://oauth2.googleapis.com/token") -> str:
    return json.dumps({"type": "service_account", "project_id": PROJECT,
                       "private_key_id": "k1", "private_key": PEM, "client_email": CLIENT_EMAIL,
                       "token_uri": token_uri})


def external_model(url: str, task: str = "llm/v1/chat", name: str = "gemini-2.5-flash",
                   provider: str = "google") -> dict[str, Any]:
    """The external_model for ``provider`` ``google`` (default) or ``google-cloud-vertex-ai``."""
    if provider == "google":
        return {"provider": "google", "name": name, "task": task,
                "google_config": {"google_api_key_plaintext": API_KEY, "google_api_base": url}}
    return {"provider": "google-cloud-vertex-ai", "name": name, "task": task,
            "google_cloud_vertex_ai_config": {
                "project_id": PROJECT, "region": REGION,
                "private_key_plaintext": service_account_json(),
                "vertex_ai_api_base": url, "vertex_ai_token_url": f"{url}/token"}}


def error(code: int, message: str, details: list[Any] | None = None) -> JSONResponse:
    """Google's error body; a 429 says when to retry in a ``RetryInfo`` detail (no header)."""
    err: dict[str, Any] = {"code": code, "message": message,
                           "status": STATUS.get(code, "UNKNOWN")}
    if details:
        err["details"] = details
    return JSONResponse({"error": err}, code)


@dataclass
class State:
    tokens: set[str] = field(default_factory=set)
    token_requests: int = 0
    signatures: dict[tuple[str, tuple[str, ...]], str] = field(default_factory=dict)
    issued: set[str] = field(default_factory=set)


def _b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _tool_result(response: Any) -> str:
    if isinstance(response, dict) and set(response) == {"result"}:
        return str(response["result"])
    return json.dumps(response)


def parse(body: dict[str, Any], state: State) -> Seen | str:
    """The request as a :class:`Seen`, or the message of a 400."""
    seen = Seen()
    seen.system = " ".join(p.get("text", "") for p in
                           (body.get("systemInstruction") or {}).get("parts", []))
    user = ""
    for c in body.get("contents") or []:
        parts = c.get("parts") or []
        if c.get("role") == "user":
            responses = [p["functionResponse"] for p in parts if "functionResponse" in p]
            for r in responses:
                seen.turns.append({"role": "tool", "tool_result": _tool_result(r.get("response"))})
            if not responses:
                user = "".join(p.get("text", "") for p in parts)
                seen.turns.append({"role": "user", "text": user,
                                   "images": sum(1 for p in parts if "inlineData" in p)})
        elif c.get("role") == "model":
            for p in parts:
                sig = p.get("thoughtSignature")
                if sig and sig not in state.issued:
                    return "Corrupted thought signature."
            calls = [p for p in parts if "functionCall" in p]
            names = tuple(p["functionCall"]["name"] for p in calls)
            want = state.signatures.get((user, names))
            if calls and want and calls[0].get("thoughtSignature") != want:
                return (f"Function call is missing a thought_signature in functionCall parts. "
                        f"Additional data, function call `{names[0]}`, position 1.")
            seen.turns.append({
                "role": "assistant", "tool_calls": list(names),
                "text": "".join(p.get("text", "") for p in parts if not p.get("thought")),
                "reasoning": [(p.get("text"), p.get("thoughtSignature")) for p in parts
                              if p.get("thought")]})
        else:
            return f"Please use a valid role: user, model (got {c.get('role')!r})."
    for t in body.get("tools") or []:
        for fd in t.get("functionDeclarations") or []:
            if "parameters" in fd and "parametersJsonSchema" in fd:
                return "parameters and parametersJsonSchema are mutually exclusive."
            params = fd.get("parametersJsonSchema") or fd.get("parameters")
            seen.tools.append({"name": fd["name"], "parameters": params})
    fcc = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    allowed = fcc.get("allowedFunctionNames") or []
    seen.tool_choice = {"AUTO": "auto", "NONE": "none", "ANY": allowed[0] if len(allowed) == 1
                        else "required"}.get(fcc.get("mode", "AUTO"), "auto")
    cfg = body.get("generationConfig") or {}
    seen.thinking_budget = (cfg.get("thinkingConfig") or {}).get("thinkingBudget")
    seen.max_tokens = cfg.get("maxOutputTokens")
    schema = cfg.get("responseJsonSchema") or cfg.get("responseSchema")
    if schema is None and cfg.get("responseMimeType") == "application/json":
        schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    seen.json_schema = schema
    return seen


def answer_parts(seen: Seen, reply: Any, state: State) -> tuple[list[dict[str, Any]], Any]:
    """``(thought parts, answer parts)`` for ``reply``; signatures recorded as issued."""
    thoughts = [{"text": reply.reasoning, "thought": True}] if reply.reasoning else []
    out: list[dict[str, Any]] = []
    names = tuple(name for _, name, _ in reply.tool_calls)
    for i, (_, name, args) in enumerate(reply.tool_calls):
        out.append({"functionCall": {"name": name, "args": args}})
        if i == 0 and reply.signature:  # parallel calls: only the first carries it
            out[0]["thoughtSignature"] = reply.signature
    if not reply.tool_calls:
        out.append({"text": reply.text})
        if reply.signature:  # no call: the text part carries it
            out[0]["thoughtSignature"] = reply.signature
    if reply.signature:
        state.issued.add(reply.signature)
        if names:
            state.signatures[(seen.last_user(), names)] = reply.signature
    return thoughts, out


def usage(reply: Any, final: bool = True) -> dict[str, int]:
    u = {"promptTokenCount": reply.prompt_tokens}
    if final:
        u["candidatesTokenCount"] = reply.completion_tokens - reply.reasoning_tokens
        if reply.reasoning_tokens:
            u["thoughtsTokenCount"] = reply.reasoning_tokens
        u["totalTokenCount"] = reply.prompt_tokens + reply.completion_tokens
    return u


def _vector(text: str, dims: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest() * (dims // 32 + 1)
    return [round(b / 127.5 - 1, 4) for b in digest[:dims]]


def embed(method: str, body: dict[str, Any]) -> JSONResponse:
    if method == "batchEmbedContents":
        out = [{"values": _vector(r["content"]["parts"][0]["text"],
                                  r.get("outputDimensionality") or 8)}
               for r in body.get("requests") or []]
        return JSONResponse({"embeddings": out})
    dims = (body.get("parameters") or {}).get("outputDimensionality") or 8
    preds = [{"embeddings": {"values": _vector(i["content"], dims), "statistics": {
        "token_count": max(1, len(i["content"]) // 4), "truncated": False}}}
        for i in body.get("instances") or []]
    return JSONResponse({"predictions": preds, "metadata": {"billableCharacterCount": 1}})


def fake() -> FakeServer:
    """The fake (not started); its :class:`State` is ``server.state``."""
    state = State()

    async def generate(request: Request, rec: Any) -> Response:
        model, _, method = request.path_params["rest"].partition(":")
        body = rec.json()
        if method in ("batchEmbedContents", "predict"):
            return embed(method, body)
        if method not in ("generateContent", "streamGenerateContent"):
            return error(404, f"Method {method} not found.")
        seen = parse(body, state)
        if isinstance(seen, str):
            return error(400, seen)
        reply = think(seen)
        if reply.fail == "timeout":
            await sleep_forever()
        if reply.fail in ("400", "401", "500"):
            return error(int(reply.fail), f"Injected failure {reply.fail}.")
        if reply.fail == "429":
            return error(429, "Resource has been exhausted (e.g. check quota).", details=[
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "6.2s"}])
        include = bool((body.get("generationConfig") or {}).get("thinkingConfig", {})
                       .get("includeThoughts"))
        thoughts, parts = answer_parts(seen, reply, state)
        thoughts = thoughts if include else []
        finish = FINISH[reply.finish]
        if method == "generateContent":
            return JSONResponse({"candidates": [{"content": {"role": "model",
                                                             "parts": thoughts + parts},
                                                 "finishReason": finish, "index": 0}],
                                 "usageMetadata": usage(reply), "modelVersion": model})
        if request.query_params.get("alt") != "sse":
            return error(400, "fake: only alt=sse streaming is implemented")
        return StreamingResponse(stream(reply, thoughts, parts, finish),
                                 media_type="text/event-stream")

    async def stream(reply: Any, thoughts: list[Any], parts: list[Any],
                     finish: str) -> AsyncIterator[bytes]:
        def event(ps: list[Any], final: bool = False) -> bytes:
            cand: dict[str, Any] = {"content": {"role": "model", "parts": ps}, "index": 0}
            if final:
                cand["finishReason"] = finish
            data = {"candidates": [cand], "usageMetadata": usage(reply, final)}
            return f"data: {json.dumps(data)}\r\n\r\n".encode()

        events = [event([t]) for t in thoughts]
        if reply.tool_calls:
            events.append(event(parts))
        else:
            events += [event([{"text": p}]) for p in pieces(parts[0]["text"])]
            if parts[0].get("thoughtSignature"):  # Gemini 3: an empty text part carries it
                events.append(event([{"text": "", "thoughtSignature": parts[0]
                                      ["thoughtSignature"]}]))
        events.append(event([], final=True))
        for i, e in enumerate(events):
            yield e
            if reply.fail == "reset" and i == 0:
                raise RuntimeError("fake: connection reset mid-stream")

    async def gemini(request: Request) -> Response:
        rec = await server.record(request)
        if rec.headers.get("x-goog-api-key") != API_KEY:
            return error(400, "API key not valid. Please pass a valid API key.")
        return await generate(request, rec)

    async def vertex(request: Request) -> Response:
        rec = await server.record(request)
        auth = rec.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in state.tokens:
            return error(401, "Request had invalid authentication credentials. Expected OAuth "
                              "2 access token.")
        if (request.path_params["project"], request.path_params["region"]) != (PROJECT, REGION):
            return error(403, "Permission denied on resource project.")
        return await generate(request, rec)

    async def token(request: Request) -> Response:
        rec = await server.record(request)
        state.token_requests += 1
        form = dict(urllib.parse.parse_qsl(rec.body.decode()))
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return JSONResponse({"error": "unsupported_grant_type"}, 400)
        try:
            head, claims_b64, sig = form["assertion"].split(".")
            KEY.public_key().verify(_b64url_decode(sig), f"{head}.{claims_b64}".encode(),
                                    padding.PKCS1v15(), hashes.SHA256())
            claims = json.loads(_b64url_decode(claims_b64))
        except (KeyError, ValueError, InvalidSignature):
            return JSONResponse({"error": "invalid_grant",
                                 "error_description": "Invalid JWT Signature."}, 400)
        now = time.time()
        if (claims.get("iss") != CLIENT_EMAIL or claims.get("scope") != SCOPE
                or claims.get("aud") != f"{server.url}/token"
                or not claims["iat"] - 60 <= now < claims["exp"] <= claims["iat"] + 3600):
            return JSONResponse({"error": "invalid_grant",
                                 "error_description": f"Invalid JWT claims: {claims}"}, 400)
        access = f"ya29.fake-{state.token_requests}-{hashlib.sha1(sig.encode()).hexdigest()[:8]}"
        state.tokens.add(access)
        return JSONResponse({"access_token": access, "expires_in": 3599, "token_type": "Bearer"})

    server = FakeServer([
        Route("/v1beta/models/{rest:path}", gemini, methods=["POST"]),
        Route("/v1/projects/{project}/locations/{region}/publishers/google/models/{rest:path}",
              vertex, methods=["POST"]),
        Route("/token", token, methods=["POST"]),
    ])
    server.state = state  # type: ignore[attr-defined]
    return server


__all__ = ["API_KEY", "fake", "external_model", "instance"]
