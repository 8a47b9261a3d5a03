"""The models guardrails call, from this server's own serving endpoints.

``valid_topics`` embeds with the topic embeddings endpoint (``FMSERVE_TOPIC_ENDPOINT``,
default the bundled ``databricks-all-minilm-l6-v2``); ``safety`` asks the safety endpoint
(``FMSERVE_SAFETY_ENDPOINT``, a chat endpoint prompted as Llama Guard). Both are called
directly on a served entity's backend, as the server (no permission check, no rate
limit, no usage record of their own). A failing call is a 503 naming the endpoint:
a guardrail never passes silently.
"""

from __future__ import annotations

import random

import numpy as np

from fmserve.errors import FmserveError, TemporarilyUnavailable
from fmserve.protocol.chat import ChatCompletionRequest
from fmserve.protocol.embeddings import EmbeddingsRequest
from fmserve.serving.endpoints import TASK_CHAT, TASK_EMBEDDINGS, EndpointRegistry

SAFETY_MAX_TOKENS = 16  # "unsafe\nS1,S10" fits


class RegistryModels:
    """:class:`~fmserve.gateway.guardrails.GuardrailModels` over ``registry``."""

    def __init__(self, registry: EndpointRegistry, topic_endpoint: str,
                 safety_endpoint: str | None) -> None:
        self.registry = registry
        self.topic_endpoint = topic_endpoint
        self.safety_endpoint = safety_endpoint or None
        self.rng = random.Random()

    def _problem(self, name: str | None, task: str, what: str, env: str) -> str | None:
        if not name:
            return f"no {what} endpoint is configured ({env})"
        ep = self.registry.find(name)
        if ep is None:
            return (f"the {what} endpoint '{name}' ({env}) is not served here"
                    + (" (the server runs with --no-bundled)" if name.startswith("databricks-")
                       else ""))
        if ep.task != task:
            return f"the {what} endpoint '{name}' serves {ep.task}, not {task}"
        return None

    def embeddings_problem(self) -> str | None:
        return self._problem(self.topic_endpoint, TASK_EMBEDDINGS, "topic embeddings",
                             "FMSERVE_TOPIC_ENDPOINT")

    def safety_problem(self) -> str | None:
        return self._problem(self.safety_endpoint, TASK_CHAT, "safety",
                             "FMSERVE_SAFETY_ENDPOINT")

    async def embed(self, texts: list[str]) -> np.ndarray:
        problem = self.embeddings_problem()
        if problem:
            raise TemporarilyUnavailable(f"valid_topics cannot be checked: {problem}.",
                                         retry_after=5)
        entity = self.registry.get(self.topic_endpoint).pick(self.rng)
        try:
            entity.backend.before_request()
            result = await entity.backend.embed(EmbeddingsRequest(input=texts))
        except FmserveError as exc:
            raise TemporarilyUnavailable(
                f"valid_topics cannot be checked: the topic embeddings endpoint "
                f"'{self.topic_endpoint}' failed: {exc.message}", retry_after=5) from None
        return np.asarray(result.vectors, dtype=np.float32)

    async def classify(self, prompt: str) -> str:
        problem = self.safety_problem()
        if problem:
            raise TemporarilyUnavailable(f"The safety filter cannot run: {problem}.",
                                         retry_after=5)
        assert self.safety_endpoint is not None
        entity = self.registry.get(self.safety_endpoint).pick(self.rng)
        req = ChatCompletionRequest.model_validate({
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": SAFETY_MAX_TOKENS, "temperature": 0})
        try:
            entity.backend.before_request()
            answer = await entity.backend.chat(req)
        except FmserveError as exc:
            raise TemporarilyUnavailable(
                f"The safety filter cannot run: the safety endpoint '{self.safety_endpoint}' "
                f"failed: {exc.message}", retry_after=5) from None
        choices = answer.get("choices") or [{}]
        content = (choices[0].get("message") or {}).get("content")
        if isinstance(content, list):
            content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""
