"""Chat and completions requests (spec §8.1, §8.4; OpenAI ``/v1/chat/completions``).

Lenient like the real service where clients need it (unknown OpenAI extras such as
``stream_options``, ``user``, ``frequency_penalty`` are accepted), strict where the
real service is strict (``stop: null`` is rejected, ``n`` is 1–5, ``messages``
must not be empty).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator


class ContentPart(BaseModel):
    """One item of a list ``content``: ``{"type": "text", "text": ...}`` or an image."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """A chat message; ``content`` is a string, a list of content parts or null."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text; list content is joined (text parts only)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class SamplingParams(BaseModel):
    """Sampling fields shared by chat and completions.

    Units: ``max_tokens`` in tokens; ``temperature`` 0.0–2.0; ``top_p`` (0, 1];
    ``top_k`` > 0 tokens; ``n`` 1–5 choices.
    """

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=5)
    seed: int | None = None
    stream: bool = False
    extra_params: dict[str, Any] | None = None
    client_request_id: str | None = None
    usage_context: dict[str, Any] | None = None
    # Headers a backend adds to the HTTP answer (e.g. an image-size warning).
    _response_headers: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def response_headers(self) -> dict[str, str]:
        return self._response_headers

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_not_null(cls, v: Any) -> Any:
        # Only called when the field is present: an explicit null is an error,
        # as on the real service (spec §6.3, langchain-ai/langchain#14100).
        if v is None:
            raise ValueError("stop was not of type List[String]: null")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def effective_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


class ChatCompletionRequest(SamplingParams):
    """``llm/v1/chat`` request. ``messages`` is required and non-empty."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    # Reasoning (spec §8.1): Anthropic-style ``thinking`` {"type": "enabled",
    # "budget_tokens": int < max_tokens} or OpenAI-style ``reasoning_effort``.
    thinking: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None

    def estimated_prompt_tokens(self) -> int:
        """Prompt tokens of the messages' text estimated (4 characters a token), for
        providers that report no usage; images are counted by ``providers.images``."""
        return sum(len(m.text()) for m in self.messages) // 4

    def has_images(self) -> bool:
        """True when any message carries an ``image_url``/``image`` content part."""
        return any(isinstance(m.content, list) and any(p.type in ("image_url", "image")
                                                        for p in m.content)
                   for m in self.messages)

    def wants_reasoning(self) -> bool:
        t = (self.thinking or {}).get("type")
        return t in ("enabled", "adaptive") or self.reasoning_effort not in (None, "none")


class CompletionRequest(SamplingParams):
    """``llm/v1/completions`` request: ``prompt`` is a string or a list of strings."""

    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
