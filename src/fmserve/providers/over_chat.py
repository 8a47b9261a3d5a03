"""Answers assembled from chat calls: ``n`` choices from ``n`` single calls, completions
from a chat model (each prompt one user turn). Pure functions, dict in, dict out; the
calls themselves are made by :class:`~fmserve.providers.base.ExternalBackend`.
"""

from __future__ import annotations

from typing import Any

from fmserve.protocol.chat import ChatCompletionRequest, ChatMessage, CompletionRequest

Body = dict[str, Any]


def merge_choices(answers: list[Body]) -> Body:
    """One chat completion of the first choice of each answer (``n`` single calls).

    Choices are re-indexed 0…n-1; integer usage fields are summed, except the prompt
    (the same for every call), which is counted once.
    """
    choices = [{**a["choices"][0], "index": i} for i, a in enumerate(answers)]
    usage: dict[str, int] = {}
    for a in answers:
        for k, v in (a.get("usage") or {}).items():
            if isinstance(v, int):
                usage[k] = usage.get(k, 0) + v
    if "prompt_tokens" in usage:
        usage["prompt_tokens"] //= len(answers)
        usage["total_tokens"] = usage["prompt_tokens"] + usage.get("completion_tokens", 0)
    return {"object": "chat.completion", "choices": choices, "usage": usage}


def as_chat(req: CompletionRequest, prompt: str) -> ChatCompletionRequest:
    """The chat request for one prompt of a completions request (one user turn)."""
    fields = req.model_dump(exclude={"prompt"}, exclude_none=True)
    fields["messages"] = [ChatMessage(role="user", content=prompt)]
    return ChatCompletionRequest.model_validate(fields)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content or [] if b.get("type") == "text")


def completion_of(answers: list[Body]) -> Body:
    """A ``text_completion`` body of chat answers (one per prompt, in order): text
    blocks joined, reasoning dropped, usage summed (tokens)."""
    choices: list[Body] = []
    prompt_t = completion_t = 0
    for a in answers:
        for c in a["choices"]:
            choices.append({"index": len(choices), "text": _text(c["message"].get("content")),
                            "finish_reason": c.get("finish_reason"), "logprobs": None})
        u = a.get("usage") or {}
        prompt_t += u.get("prompt_tokens", 0)
        completion_t += u.get("completion_tokens", 0)
    return {"object": "text_completion", "choices": choices,
            "usage": {"prompt_tokens": prompt_t, "completion_tokens": completion_t,
                      "total_tokens": prompt_t + completion_t}}


def completion_chunk(chunk: Body) -> Body:
    """A ``text_completion`` chunk of a chat chunk (string content only, usage kept)."""
    out = []
    for c in chunk.get("choices", []):
        d = c.get("delta") or {}
        text = d.get("content") if isinstance(d.get("content"), str) else ""
        out.append({"index": c.get("index", 0), "text": text or "",
                    "finish_reason": c.get("finish_reason"), "logprobs": None})
    return {"object": "text_completion", "choices": out, "usage": chunk.get("usage")}
