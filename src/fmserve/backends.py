"""The one seam every local engine (``engines/``) and external provider (``providers/``) implements.

A backend answers in OpenAI shapes without ``id``/``model``/``created`` (the
serving layer adds those):

* ``chat(req)`` → ``{"choices": [{"index", "message", "finish_reason"}], "usage"}``
* ``chat_stream(req)`` → chunks ``{"choices": [{"index", "delta", "finish_reason"}], "usage"}``
  (``usage`` cumulative on every chunk, spec §8.3)
* ``complete(req)`` / ``complete_stream(req)`` → the same with ``text`` choices
* ``embed(req)`` → :class:`EmbeddingResult`

A feature the backend lacks is a 400 before any work starts
(:meth:`Capabilities.require`), never a silent drop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fmserve.errors import InvalidParameterValue
from fmserve.protocol.chat import ChatCompletionRequest, CompletionRequest
from fmserve.protocol.embeddings import EmbeddingsRequest


@dataclass(frozen=True)
class Capabilities:
    chat: bool = False
    completions: bool = False
    embeddings: bool = False
    tools: bool = False
    json_schema: bool = False
    vision: bool = False
    reasoning: bool = False

    def require(self, feature: str, what: str, entity: str) -> None:
        """Raise 400 ``INVALID_PARAMETER_VALUE`` if ``feature`` is not supported."""
        if not getattr(self, feature):
            raise InvalidParameterValue(f"{what} is not supported by served entity '{entity}'.")


@dataclass
class EmbeddingResult:
    """``vectors``: float32 array of shape (len(input), dimensions); tokens counted."""

    vectors: np.ndarray
    prompt_tokens: int


class Backend:
    """Base of every backend: each kind it does not override is a 400."""

    name: str
    capabilities: Capabilities = Capabilities()

    def ready(self) -> bool:
        return True

    def before_request(self) -> None:
        """Called by the serving layer before each request (e.g. to pick up rotated secrets)."""

    def describe(self) -> dict[str, Any]:
        return {}

    async def prompt_tokens(self, req: ChatCompletionRequest | CompletionRequest
                            ) -> int | None:
        """The request's prompt length in this entity's tokens (all distinct prompts),
        or None where it cannot be counted here (external models: the gateway then
        reserves an upper bound). Called before admission."""
        return None

    def _unsupported(self, what: str) -> InvalidParameterValue:
        return InvalidParameterValue(f"{what} is not supported by served entity '{self.name}'.")

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        raise self._unsupported("Chat")

    def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[dict[str, Any]]:
        raise self._unsupported("Chat")

    async def complete(self, req: CompletionRequest) -> dict[str, Any]:
        raise self._unsupported("Completions")

    def complete_stream(self, req: CompletionRequest) -> AsyncIterator[dict[str, Any]]:
        raise self._unsupported("Completions")

    async def embed(self, req: EmbeddingsRequest) -> EmbeddingResult:
        raise self._unsupported("Embeddings")
