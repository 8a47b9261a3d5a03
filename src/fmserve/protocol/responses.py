"""Provider-neutral pieces of a chat answer: usage, reasoning items, stream chunks, and
what a request asks of thinking. Local engines and external providers both build their
answers from these, so every backend answers in one shape.

* **Usage** (spec §8.6): ``{"prompt_tokens", "completion_tokens", "total_tokens"}`` in
  tokens, plus ``reasoning_tokens`` when the model reasoned (counted inside
  ``completion_tokens``) and OpenAI's ``prompt_tokens_details.cached_tokens`` when part of
  the prompt came from a prefix cache. Stream chunks carry it cumulatively.
* **Reasoning items** (spec §8.2): ``{"type": "reasoning", "summary": [{"type":
  "summary_text", "text", "signature"?}]}``, or ``summary_encrypted_text`` with ``data``
  for redacted thinking.
* **Chunks** (spec §8.3): ``{"object": "chat.completion.chunk", "choices": [{"index",
  "delta", "finish_reason"}], "usage"}``; id/model/created are added by the serving layer.
* **Thinking** (spec §8.1): ``thinking: {"type": "enabled", "budget_tokens": B}`` /
  ``{"type": "adaptive"}`` / ``{"type": "disabled"}`` (Anthropic extended thinking), or
  OpenAI's ``reasoning_effort``. :func:`requested_thinking` validates it once; a
  provider applies its own limits on top (Anthropic's ``budget_tokens`` ≥ 1024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fmserve.errors import InvalidParameterValue

# reasoning_effort → thinking budget (tokens). "minimal" is 1024, the same as "low": no
# vendor takes a smaller budget — Anthropic's budget_tokens and Gemini's thinkingBudget
# start at 1024 (docs.anthropic.com "Extended thinking"; ai.google.dev "Thinking"), and
# Gemini's OpenAI compatibility maps reasoning_effort "low" to 1,024 tokens
# (ai.google.dev/gemini-api/docs/openai); OpenAI's "minimal" means "as few as possible".
EFFORT_BUDGET = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384}
ADAPTIVE_BUDGET = EFFORT_BUDGET["medium"]  # thinking "adaptive" where a budget is needed


def effort_for(budget: int | None) -> str:
    """The ``reasoning_effort`` ("low", "medium", "high") whose budget covers ``budget``
    tokens: the reverse of :data:`EFFORT_BUDGET`, for providers that take an effort."""
    for effort in ("low", "medium"):
        if budget is not None and budget <= EFFORT_BUDGET[effort]:
            return effort
    return "high"


def usage(prompt: int, completion: int, reasoning: int | None = None,
          cached: int = 0) -> dict[str, Any]:
    """A usage object (tokens); ``reasoning`` and ``cached`` appear only when non-zero."""
    u: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                         "total_tokens": prompt + completion}
    if reasoning:
        u["reasoning_tokens"] = reasoning
    if cached:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return u


def reasoning_item(text: str, signature: str | None = None,
                   encrypted: str | None = None) -> dict[str, Any]:
    """One reasoning content item; ``encrypted`` (redacted thinking) wins over text."""
    if encrypted is not None:
        return {"type": "reasoning",
                "summary": [{"type": "summary_encrypted_text", "data": encrypted}]}
    s: dict[str, Any] = {"type": "summary_text", "text": text}
    if signature:
        s["signature"] = signature
    return {"type": "reasoning", "summary": [s]}


def chat_chunk(index: int, delta: dict[str, Any], finish: str | None,
               usage_: dict[str, Any], logprobs: list[dict[str, Any]] | None = None
               ) -> dict[str, Any]:
    """A ``chat.completion.chunk`` of one choice; ``logprobs``: its tokens' entries."""
    choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
    if logprobs:
        choice["logprobs"] = {"content": logprobs, "refusal": None}
    return {"object": "chat.completion.chunk", "choices": [choice], "usage": usage_}


def estimate_reasoning_tokens(thinking_chars: int) -> int:
    """Reasoning tokens estimated from thinking text (4 characters a token), for providers
    (Anthropic, Bedrock Converse) that count thinking inside ``output_tokens`` only."""
    return max(1, thinking_chars // 4) if thinking_chars else 0


@dataclass(frozen=True)
class Thinking:
    """What a request asks of thinking.

    Attributes:
        mode: ``"off"`` (``thinking.type`` disabled or ``reasoning_effort`` none),
            ``"on"`` (enabled, adaptive, or an effort) or ``"default"`` (not asked).
        budget: tokens, for ``"on"``: ``budget_tokens`` or the effort's budget; None for
            adaptive (the model decides).
        explicit: the budget is the caller's ``budget_tokens`` (not from an effort).
    """

    mode: str
    budget: int | None = None
    explicit: bool = False


def requested_thinking(thinking: dict[str, Any] | None, reasoning_effort: str | None,
                       max_tokens: int | None) -> Thinking:
    """Validates ``thinking`` / ``reasoning_effort`` (``thinking`` wins when both are given).

    Raises:
        InvalidParameterValue: an unknown ``thinking.type``; ``budget_tokens`` missing or
            not a positive integer when enabled, or not below ``max_tokens``.
    """
    if thinking is not None:
        kind = thinking.get("type")
        if kind == "disabled":
            return Thinking("off")
        if kind == "adaptive":
            return Thinking("on")
        if kind != "enabled":
            raise InvalidParameterValue("thinking.type must be 'enabled', 'adaptive' or "
                                        "'disabled'")
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise InvalidParameterValue("thinking.budget_tokens (a positive integer) is "
                                        "required when thinking is enabled")
        if max_tokens is not None and budget >= max_tokens:
            raise InvalidParameterValue(f"thinking.budget_tokens ({budget}) must be less "
                                        f"than max_tokens ({max_tokens})")
        return Thinking("on", budget, explicit=True)
    if reasoning_effort == "none":
        return Thinking("off")
    if reasoning_effort:
        return Thinking("on", EFFORT_BUDGET[reasoning_effort])
    return Thinking("default")
