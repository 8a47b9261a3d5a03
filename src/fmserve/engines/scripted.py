"""A deterministic engine that replays scripted token streams (tests and demos).

Spec: ``{"engine": "scripted", "script": [token texts], "answer": [token texts],
"opens_think": bool, "reasoning": bool, "token_delay_s": float}``. A generation
emits ``script`` token by token (``answer`` instead when the prompt was prefilled
with a closed thinking section: ``no_think`` or ``think_prefix``), honouring
``max_tokens`` and cancellation, with the same ``start``/``tok``/``end`` events as
the llama.cpp engines (``engines/ipc.py``). It lets the reasoning parser and the
thinking budget be tested on real token streams without a reasoning GGUF.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fmserve.engines.reasoning import think_prompt

Emit = Callable[[dict[str, Any]], None]


class ScriptedEngine:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.script = list(spec.get("script") or [])
        self.answer = list(spec.get("answer") or [])
        self.opens_think = bool(spec.get("opens_think"))
        self.reasoning = bool(spec.get("reasoning", True))
        self.delay_s = float(spec.get("token_delay_s") or 0.002)

    def info(self) -> dict[str, Any]:
        return {"engine": "scripted", "model": "scripted", "n_ctx": 4096,
                "chat_template": True, "reasoning": self.reasoning}

    def handle(self, msg: dict[str, Any], emit: Emit, cancelled: Callable[[], bool]) -> None:
        rid, params = msg["id"], msg.get("params") or {}
        prompt = " ".join(str(m.get("content") or "") for m in msg.get("messages") or [])
        prompt += "<think>" if self.opens_think else ""
        prompt, thinking = think_prompt(prompt, params)
        prefilled = params.get("no_think") or params.get("think_prefix") is not None
        tokens = self.answer if prefilled else self.script
        emit({"t": "start", "id": rid, "prompt_tokens": max(1, len(prompt) // 4),
              "thinking": thinking})
        limit = int(params.get("max_tokens") or 1 << 30)
        count, reason = 0, "stop"
        for text in tokens:
            if cancelled():
                reason = "cancelled"
                break
            if count >= limit:
                reason = "length"
                break
            time.sleep(self.delay_s)
            count += 1
            emit({"t": "tok", "id": rid, "text": text, "n": count})
        emit({"t": "end", "id": rid, "finish_reason": reason, "prompt_tokens": len(prompt) // 4,
              "completion_tokens": count})
