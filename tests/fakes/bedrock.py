"""A fake Amazon Bedrock runtime: Converse, ConverseStream and InvokeModel (embeddings).

Speaks the real wire format (bedrock-runtime API reference): JSON bodies, errors as
``{"message"}`` with an ``x-amzn-ErrorType`` header, and ConverseStream as binary
``application/vnd.amazon.eventstream`` frames (prelude, string headers, JSON payload,
CRC32s). Every request's SigV4 signature is recomputed with botocore from the known test
keys; a mismatch is Bedrock's 403 ``InvalidSignatureException``.

Besides the brain's ``FAIL:`` triggers, the last user text may hold ``BEDROCK:<case>``:
``throttle-stream`` (an exception frame after the first event), ``corrupt`` (a frame with
a bad CRC), ``truncated`` (no messageStop/metadata), ``modeltimeout`` (408
ModelTimeoutException).
"""

from __future__ import annotations

import binascii
import hashlib
import json
import re
import struct
from collections.abc import AsyncIterator
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fakes.brain import Reply, Seen, pieces, think
from fakes.server import FakeServer, sleep_forever

KEY_ID = "AKIAFMSERVETEST00042"
SECRET = "fmserveFakeBedrockSecret/Key+0123456789xyz"
REGION = "us-west-2"
CHAT_MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/bedrock/aws4_request, "
                   r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})$")
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def external_model(url: str, task: str = "llm/v1/chat", name: str = CHAT_MODEL,
                   bedrock_provider: str = "anthropic") -> dict[str, Any]:
    return {"provider": "amazon-bedrock", "name": name, "task": task,
            "amazon_bedrock_config": {
                "aws_region": REGION, "bedrock_provider": bedrock_provider,
                "aws_access_key_id_plaintext": KEY_ID,
                "aws_secret_access_key_plaintext": SECRET, "bedrock_endpoint_url": url}}


def error(status: int, etype: str, message: str, **headers: str) -> Response:
    return JSONResponse({"message": message}, status, headers={
        "x-amzn-ErrorType": f"{etype}:http://internal.amazon.com/coral/com.amazon.bedrock/",
        "x-amzn-RequestId": "fake-request-id", **headers})


def check_signature(request: Request, body: bytes) -> Response | None:
    """Bedrock's 403 when the SigV4 signature does not match (recomputed with botocore)."""
    m = _AUTH.match(request.headers.get("authorization", ""))
    if not m:
        return error(403, "MissingAuthenticationTokenException",
                     "Missing Authentication Token")
    key_id, _, region, signed, signature = m.groups()
    if key_id != KEY_ID:
        return error(403, "UnrecognizedClientException",
                     "The security token included in the request is invalid.")
    headers = {h: request.headers.get(h, "") for h in signed.split(";")}
    url = f"http://{request.headers['host']}{request.scope['raw_path'].decode()}"
    aws = AWSRequest(method=request.method, url=url, data=body, headers=headers)
    aws.context["timestamp"] = request.headers.get("x-amz-date", "")
    signer = SigV4Auth(Credentials(KEY_ID, SECRET), "bedrock", region)
    expected = signer.signature(signer.string_to_sign(aws, signer.canonical_request(aws)), aws)
    if region != REGION or expected != signature:
        return error(403, "InvalidSignatureException",
                     "The request signature we calculated does not match the signature you "
                     "provided. Check your AWS Secret Access Key and signing method. Consult "
                     "the service documentation for details.")
    return None


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (total len, headers len, CRC), headers, payload, CRC."""
    hb = b"".join(struct.pack(">B", len(k)) + k.encode() + b"\x07" + struct.pack(">H", len(v))
                  + v.encode() for k, v in headers.items())
    prelude = struct.pack(">II", 12 + len(hb) + len(payload) + 4, len(hb))
    msg = prelude + struct.pack(">I", binascii.crc32(prelude)) + hb + payload
    return msg + struct.pack(">I", binascii.crc32(msg))


def event(kind: str, payload: dict[str, Any]) -> bytes:
    return frame({":event-type": kind, ":content-type": "application/json",
                  ":message-type": "event"}, json.dumps({**payload, "p": "abcdef"}).encode())


def seen_of(body: dict[str, Any]) -> Seen:
    seen = Seen(system=" ".join(b.get("text", "") for b in body.get("system") or []))
    for msg in body.get("messages") or []:
        turn: dict[str, Any] = {"role": msg["role"], "text": "", "images": 0, "tool_calls": [],
                                "tool_result": None, "reasoning": []}
        for b in msg.get("content") or []:
            if "toolResult" in b:
                res = b["toolResult"]["content"][0]
                seen.turns.append({"role": "tool", "text": "", "tool_result": res.get(
                    "text", json.dumps(res.get("json")))})
            elif "text" in b:
                turn["text"] += b["text"]
            elif "image" in b:
                turn["images"] += 1
            elif "toolUse" in b:
                turn["tool_calls"].append(b["toolUse"]["name"])
            elif "reasoningContent" in b:
                rt = b["reasoningContent"].get("reasoningText") or {}
                turn["reasoning"].append((rt.get("text"), rt.get("signature")))
        if turn["text"] or turn["images"] or turn["tool_calls"] or msg["role"] == "assistant":
            seen.turns.append(turn)
    tc = body.get("toolConfig") or {}
    seen.tools = [{"name": t["toolSpec"]["name"], "parameters": t["toolSpec"]["inputSchema"][
        "json"]} for t in tc.get("tools") or []]
    choice = tc.get("toolChoice") or {"auto": {}}
    seen.tool_choice = ("required" if "any" in choice else
                        choice["tool"]["name"] if "tool" in choice else "auto")
    seen.thinking_budget = ((body.get("additionalModelRequestFields") or {}).get("thinking")
                            or {}).get("budget_tokens")
    seen.max_tokens = (body.get("inferenceConfig") or {}).get("maxTokens")
    return seen


def validate(body: dict[str, Any]) -> str | None:
    """What real Bedrock rejects as a ValidationException (a subset)."""
    msgs = body.get("messages") or []
    if not msgs or msgs[0]["role"] != "user":
        return "A conversation must start with a user message. Try again with a conversation " \
               "that starts with a user message."
    if any(a["role"] == b["role"] for a, b in zip(msgs, msgs[1:], strict=False)):
        return "A conversation must alternate between user and assistant roles."
    blocks = [b for m in msgs for b in m.get("content") or []]
    if any(("toolUse" in b or "toolResult" in b) for b in blocks) and not body.get("toolConfig"):
        return "The toolConfig field must be defined when using toolUse and toolResult " \
               "content blocks."
    if any("text" in b and not b["text"] for b in blocks):
        return "The text field in the ContentBlock object is blank."
    return None


def usage(r: Reply) -> dict[str, int]:
    return {"inputTokens": r.prompt_tokens, "outputTokens": r.completion_tokens,
            "totalTokens": r.prompt_tokens + r.completion_tokens}


def converse_body(r: Reply) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if r.reasoning:
        content.append({"reasoningContent": {"reasoningText": {"text": r.reasoning,
                                                               "signature": r.signature}}})
    if r.text:
        content.append({"text": r.text})
    content += [{"toolUse": {"toolUseId": i, "name": n, "input": a}} for i, n, a in r.tool_calls]
    return {"output": {"message": {"role": "assistant", "content": content}},
            "stopReason": _STOP[r.finish], "usage": usage(r), "metrics": {"latencyMs": 12}}


async def stream_frames(r: Reply, case: str) -> AsyncIterator[bytes]:
    yield event("messageStart", {"role": "assistant"})
    if r.fail == "reset":
        raise ConnectionResetError("fake Bedrock drops the stream")
    if case == "throttle-stream":
        yield frame({":exception-type": "throttlingException", ":content-type":
                     "application/json", ":message-type": "exception"},
                    b'{"message":"Too many tokens, please wait before trying again."}')
        return
    if case == "corrupt":
        bad = bytearray(event("contentBlockDelta", {"delta": {"text": "x"},
                                                    "contentBlockIndex": 0}))
        bad[-1] ^= 0xFF
        yield bytes(bad)
        return
    idx = 0
    if r.reasoning:
        for p in pieces(r.reasoning):
            yield event("contentBlockDelta", {"delta": {"reasoningContent": {"text": p}},
                                              "contentBlockIndex": idx})
        yield event("contentBlockDelta", {"delta": {"reasoningContent": {
            "signature": r.signature}}, "contentBlockIndex": idx})
        yield event("contentBlockStop", {"contentBlockIndex": idx})
        idx += 1
    if r.text:
        for p in pieces(r.text):
            yield event("contentBlockDelta", {"delta": {"text": p}, "contentBlockIndex": idx})
        yield event("contentBlockStop", {"contentBlockIndex": idx})
        idx += 1
    for call_id, name, args in r.tool_calls:
        yield event("contentBlockStart", {"start": {"toolUse": {"toolUseId": call_id,
                                                               "name": name}},
                                          "contentBlockIndex": idx})
        for p in pieces(json.dumps(args), 2):
            yield event("contentBlockDelta", {"delta": {"toolUse": {"input": p}},
                                              "contentBlockIndex": idx})
        yield event("contentBlockStop", {"contentBlockIndex": idx})
        idx += 1
    if case == "truncated":
        return
    yield event("messageStop", {"stopReason": _STOP[r.finish]})
    yield event("metadata", {"usage": usage(r), "metrics": {"latencyMs": 12}})


def vector(text: str, dims: int = 8) -> list[float]:
    h = hashlib.sha256(text.encode()).digest()
    return [round(b / 255 - 0.5, 4) for b in h[:dims]]


def fake() -> FakeServer:
    server: FakeServer

    async def handle(request: Request) -> Response:
        rec = await server.record(request)
        denied = check_signature(request, rec.body)
        if denied is not None:
            return denied
        try:
            body = json.loads(rec.body)
        except ValueError:
            return error(400, "SerializationException", "Unable to parse request body.")
        action = request.path_params["action"]
        if action == "invoke":
            return invoke(body)
        problem = validate(body)
        if problem:
            return error(400, "ValidationException", problem)
        seen = seen_of(body)
        reply = think(seen)
        m = re.search(r"BEDROCK:([\w-]+)", seen.last_user())
        case = m.group(1) if m else ""
        if case == "modeltimeout":
            return error(408, "ModelTimeoutException", "Model has timed out in processing "
                         "the request. Try your request again.")
        if reply.fail == "timeout":
            await sleep_forever()
        if reply.fail == "400":
            return error(400, "ValidationException", "Malformed input request: FAIL:400")
        if reply.fail == "401":
            return error(403, "UnrecognizedClientException",
                         "The security token included in the request is invalid.")
        if reply.fail == "429":
            return error(429, "ThrottlingException", "Too many requests, please wait before "
                         "trying again.", **{"retry-after": "2"})
        if reply.fail == "500":
            return error(500, "InternalServerException", "The server encountered an error.")
        if action == "converse":
            return JSONResponse(converse_body(reply))
        return StreamingResponse(stream_frames(reply, case),
                                 media_type="application/vnd.amazon.eventstream")

    def invoke(body: dict[str, Any]) -> Response:
        if "inputText" in body:
            text = body["inputText"]
            return JSONResponse({"embedding": vector(text, body.get("dimensions", 8)),
                                 "inputTextTokenCount": max(1, len(text) // 4)})
        if "texts" in body:
            if body.get("input_type") not in ("search_document", "search_query",
                                              "classification", "clustering"):
                return error(400, "ValidationException", "input_type is required")
            tokens = sum(max(1, len(t) // 4) for t in body["texts"])
            return JSONResponse({"embeddings": [vector(t) for t in body["texts"]],
                                 "id": "fake-id", "response_type": "embeddings_floats",
                                 "texts": body["texts"]},
                                headers={"X-Amzn-Bedrock-Input-Token-Count": str(tokens)})
        return error(400, "ValidationException", "Malformed input request")

    server = FakeServer([Route("/model/{model:path}/{action:str}", handle, methods=["POST"])])
    return server
