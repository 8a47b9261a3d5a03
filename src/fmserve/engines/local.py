"""Backends over local worker processes: llama.cpp generation and embeddings.

Each choice of a request (``n`` choices × prompts) is one worker request; the
worker streams text, and this module shapes it into OpenAI chat/completions
bodies and chunks (spec §8.2–§8.4) with exact token usage.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from fmserve.backends import Backend, Capabilities, EmbeddingResult
from fmserve.engines.pool import WorkerPool
from fmserve.engines.reasoning import local_budget, reasoned_chat, reasoned_stream
from fmserve.engines.structured import ToolPlan, render_history, response_grammar
from fmserve.engines.supervisor import WorkerRequest
from fmserve.errors import InvalidParameterValue
from fmserve.protocol.chat import ChatCompletionRequest, CompletionRequest, SamplingParams
from fmserve.protocol.embeddings import EmbeddingsRequest

# extra_params keys the llama.cpp engine honours; any other key is a 400.
_EXTRA_SAMPLING = {"top_k", "top_p", "seed", "temperature", "max_tokens", "stop",
                   "presence_penalty", "frequency_penalty", "repeat_penalty", "min_p"}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def sampling_params(req: SamplingParams) -> dict[str, Any]:
    """The engine's ``params`` from request fields and ``extra_params``.

    Raises:
        InvalidParameterValue: an ``extra_params`` key the engine cannot honour.
    """
    params: dict[str, Any] = {
        "max_tokens": req.effective_max_tokens(),
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "stop": req.stop,
        "seed": req.seed,
    }
    extras = dict(req.model_extra or {})
    for key in ("presence_penalty", "frequency_penalty"):
        if extras.get(key) is not None:
            params[key] = extras[key]
    for key, value in (req.extra_params or {}).items():
        if key not in _EXTRA_SAMPLING:
            raise InvalidParameterValue(
                f"extra_params.{key} is not supported by local llama.cpp models; "
                f"supported: {', '.join(sorted(_EXTRA_SAMPLING))}.")
        params[key] = [value] if key == "stop" and isinstance(value, str) else value
    return params


class _Choice:
    """One worker request plus its output index and accumulated text."""

    def __init__(self, index: int, req: WorkerRequest) -> None:
        self.index = index
        self.req = req
        self.text: list[str] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None


class LlamaBackend(Backend):
    """Chat and completions on a llama.cpp worker (GGUF, chat template from the file)."""

    def __init__(self, name: str, worker: WorkerPool) -> None:
        self.name = name
        self.worker = worker

    def ready(self) -> bool:
        return self.worker.state == "ready"

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        """Reasoning only for models whose chat template emits ``<think>`` sections."""
        return Capabilities(chat=True, completions=True, tools=True, json_schema=True,
                            reasoning=bool(self.worker.info.get("reasoning")))

    def describe(self) -> dict[str, Any]:
        return dict(self.worker.info)

    def _reasoning(self, req: ChatCompletionRequest, plan: ToolPlan,
                   ops: list[dict[str, Any]]) -> int | None | bool:
        """For a reasoning model: adjust ``ops`` and return the thinking budget (None =
        unlimited); False when the model does not reason or thinking is skipped."""
        if not self.worker.info.get("reasoning"):
            return False
        allowed, budget = local_budget(req)
        constrained = plan.active or response_grammar(req.response_format) is not None
        if constrained or not allowed:
            for op in ops:
                op["params"] = {**op["params"], "no_think": True}
            return False
        return budget

    # -- request → worker ops ------------------------------------------------
    def _chat_messages(self, req: ChatCompletionRequest) -> list[dict[str, Any]]:
        if (req.model_extra or {}).get("logprobs"):
            raise InvalidParameterValue(
                f"'logprobs' is not supported by served entity '{self.name}'.")
        out = []
        for i, m in enumerate(req.messages):
            if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
                self.capabilities.require("vision", f"messages[{i}]: image content", self.name)
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": m.text(), "tool_calls": m.tool_calls,
                        "tool_call_id": m.tool_call_id})
        return out

    @staticmethod
    def _plan(req: ChatCompletionRequest) -> ToolPlan:
        parallel = req.parallel_tool_calls is not False
        return ToolPlan(req.tools, req.tool_choice, parallel=parallel)

    async def _submit(self, ops: list[dict[str, Any]]) -> list[_Choice]:
        choices: list[_Choice] = []
        try:
            for i, op in enumerate(ops):
                choices.append(_Choice(i, await self.worker.submit(op)))
        except BaseException:
            for c in choices:
                c.req.close()
            raise
        return choices

    def _chat_ops(self, req: ChatCompletionRequest, plan: ToolPlan) -> list[dict[str, Any]]:
        fmt_grammar = response_grammar(req.response_format)
        if plan.active and fmt_grammar:
            raise InvalidParameterValue(
                "response_format json_object/json_schema cannot be combined with tools on "
                f"'{self.name}'; use tool_choice 'none' or drop response_format.")
        messages = render_history(self._chat_messages(req), plan)
        params = sampling_params(req)
        grammar = plan.grammar() or fmt_grammar
        if grammar:
            params["grammar"] = grammar
        return [{"op": "generate", "messages": messages, "params": _nth(params, j)}
                for j in range(req.n)]

    def _completion_ops(self, req: CompletionRequest) -> list[dict[str, Any]]:
        params = sampling_params(req)
        return [{"op": "generate", "prompt": p, "params": _nth(params, j)}
                for p in req.prompts() for j in range(req.n)]

    # -- running -------------------------------------------------------------
    async def _run_all(self, choices: list[_Choice]) -> None:
        try:
            for c in choices:
                while True:
                    ev = await c.req.next()
                    if ev["t"] == "start":
                        c.prompt_tokens = ev["prompt_tokens"]
                    elif ev["t"] == "tok":
                        c.text.append(ev["text"])
                    elif ev["t"] == "end":
                        c.completion_tokens = ev["completion_tokens"]
                        c.finish_reason = ev["finish_reason"]
                        break
        finally:
            for c in choices:
                c.req.close()

    @staticmethod
    def _prompt_usage(choices: list[_Choice], n: int) -> int:
        # The prompt is counted once per distinct prompt, not once per choice.
        return sum(c.prompt_tokens for c in choices[::n])

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        plan = self._plan(req)
        ops = self._chat_ops(req, plan)
        budget = self._reasoning(req, plan, ops)
        if budget is not False:
            return await reasoned_chat(self.worker.submit, ops, budget or None)
        choices = await self._submit(ops)
        await self._run_all(choices)
        out = []
        for c in choices:
            text = "".join(c.text)
            calls = plan.parse(text)
            if calls:
                out.append({"index": c.index, "message": {"role": "assistant", "content": None,
                                                          "tool_calls": calls},
                            "finish_reason": "tool_calls"})
            else:
                out.append({"index": c.index, "message": {"role": "assistant", "content": text},
                            "finish_reason": c.finish_reason})
        return {
            "object": "chat.completion",
            "choices": out,
            "usage": _usage(self._prompt_usage(choices, req.n),
                            sum(c.completion_tokens for c in choices)),
        }

    async def complete(self, req: CompletionRequest) -> dict[str, Any]:
        choices = await self._submit(self._completion_ops(req))
        await self._run_all(choices)
        return {
            "object": "text_completion",
            "choices": [{"index": c.index, "text": "".join(c.text),
                         "finish_reason": c.finish_reason, "logprobs": None} for c in choices],
            "usage": _usage(self._prompt_usage(choices, req.n),
                            sum(c.completion_tokens for c in choices)),
        }

    def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[dict[str, Any]]:
        plan = self._plan(req)
        ops = self._chat_ops(req, plan)
        budget = self._reasoning(req, plan, ops)
        if budget is not False:
            return reasoned_stream(self.worker.submit, ops, budget or None)
        return self._stream(ops, req.n, chat=True, plan=plan)

    def complete_stream(self, req: CompletionRequest) -> AsyncIterator[dict[str, Any]]:
        return self._stream(self._completion_ops(req), req.n, chat=False)

    async def _stream(self, ops: list[dict[str, Any]], n: int, chat: bool,
                      plan: ToolPlan | None = None) -> AsyncIterator[dict[str, Any]]:
        """Chunks with cumulative usage. Choices are streamed in index order.

        The first chunk is produced only after the worker accepted the first
        prompt, so prompt errors (too long for the context) still become an
        HTTP error status rather than an in-stream error.
        """
        prompt_tokens = 0
        completion_tokens = 0  # cumulative over the request
        finished_tokens = 0  # tokens of choices already finished

        def chunk(c: _Choice, delta: dict[str, Any] | None, text: str | None,
                  finish: str | None) -> dict[str, Any]:
            body: dict[str, Any] = {"index": c.index, "finish_reason": finish}
            if chat:
                body["delta"] = delta or {}
            else:
                body["text"] = text or ""
                body["logprobs"] = None
            return {"object": "chat.completion.chunk" if chat else "text_completion",
                    "choices": [body], "usage": _usage(prompt_tokens, completion_tokens)}

        choices = await self._submit(ops)
        tools = plan is not None and plan.active
        try:
            for pos, c in enumerate(choices):
                # With tools, text that starts a call ("{" / "[") is held back and sent
                # as one tool_calls delta (with id and name) once the call is complete.
                held: list[str] | None = [] if tools else None
                decided = plan is not None and plan.mode in ("required", "named")
                while True:
                    ev = await c.req.next()
                    t = ev["t"]
                    if t == "start":
                        if pos % n == 0:
                            prompt_tokens += ev["prompt_tokens"]
                        if chat:
                            yield chunk(c, {"role": "assistant", "content": ""}, None, None)
                    elif t == "tok":
                        completion_tokens = finished_tokens + ev["n"]
                        if held is not None:
                            held.append(ev["text"])
                            so_far = "".join(held).lstrip()
                            if decided or not so_far or so_far[0] in "{[":
                                continue
                            ev = {**ev, "text": "".join(held)}
                            held = None  # plain text: stream from here on
                        yield chunk(c, {"content": ev["text"]}, ev["text"], None)
                    elif t == "end":
                        finished_tokens += ev["completion_tokens"]
                        completion_tokens = finished_tokens
                        finish = ev["finish_reason"]
                        if held is not None and plan is not None:
                            text = "".join(held)
                            calls = plan.parse(text)
                            if calls:
                                finish = "tool_calls"
                                yield chunk(c, {"tool_calls": [{**call, "index": k}
                                                               for k, call in enumerate(calls)]},
                                            None, None)
                            elif text:
                                yield chunk(c, {"content": text}, text, None)
                        yield chunk(c, {}, "", finish)
                        break
        finally:
            for c in choices:
                c.req.close()


def _nth(params: dict[str, Any], j: int) -> dict[str, Any]:
    """Params of the j-th of n choices: a given seed is offset so samples differ."""
    if j and params.get("seed") is not None:
        return {**params, "seed": params["seed"] + j}
    return params


class EmbeddingBackend(Backend):
    """Embeddings on a sentence-transformers worker."""

    capabilities = Capabilities(embeddings=True)

    def __init__(self, name: str, worker: WorkerPool) -> None:
        self.name = name
        self.worker = worker

    def ready(self) -> bool:
        return self.worker.state == "ready"

    def describe(self) -> dict[str, Any]:
        return dict(self.worker.info)

    async def embed(self, req: EmbeddingsRequest) -> EmbeddingResult:
        if req.dimensions is not None and req.dimensions != self.worker.info.get("dimensions"):
            raise InvalidParameterValue(
                f"'dimensions' must be {self.worker.info.get('dimensions')} for "
                f"'{self.name}' (it does not support shortened embeddings).")
        texts = req.texts()
        wreq = await self.worker.submit({"op": "embed", "texts": texts})
        try:
            ev = await wreq.next()
        finally:
            wreq.close()
        vecs = np.frombuffer(base64.b64decode(ev["b64"]), dtype="<f4").reshape(ev["count"],
                                                                                ev["dim"])
        return EmbeddingResult(vectors=vecs, prompt_tokens=ev["prompt_tokens"])
