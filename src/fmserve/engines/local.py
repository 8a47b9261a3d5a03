"""Backends over local worker processes: llama.cpp generation and embeddings.

Each choice of a request (``n`` choices × prompts) is one worker request; the
worker streams text, and this module shapes it into OpenAI chat/completions
bodies and chunks (spec §8.2–§8.4) with exact token usage.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from fmserve.backends import Backend, Capabilities, EmbeddingResult
from fmserve.engines.logprobs import MAX_TOP_LOGPROBS, completion_logprobs
from fmserve.engines.pool import WorkerPool
from fmserve.engines.prompt_tokens import PromptCounter
from fmserve.engines.reasoning import reasoned_chat, reasoned_stream
from fmserve.engines.sampling import reproducible
from fmserve.engines.structured import (
    ToolPlan,
    answer_violation,
    render_history,
    response_grammar,
)
from fmserve.engines.supervisor import WorkerRequest
from fmserve.errors import BadGateway, InvalidParameterValue
from fmserve.protocol.chat import ChatCompletionRequest, CompletionRequest, SamplingParams
from fmserve.protocol.embeddings import EmbeddingsRequest
from fmserve.protocol.responses import chat_chunk, requested_thinking, usage

# extra_params keys the llama.cpp engine honours; any other key is a 400.
_EXTRA_SAMPLING = {"top_k", "top_p", "seed", "temperature", "max_tokens", "stop",
                   "presence_penalty", "frequency_penalty", "repeat_penalty", "min_p"}


# Tokens a reasoning model's prompt may gain after rendering (an empty
# "<think>\n\n</think>\n\n" prefilled when thinking is off).
THINK_SLACK = 8

# Extra attempts for an answer that finished but breaks a schema keyword the grammar
# cannot enforce (uniqueItems, multipleOf, not, ...): sampled requests only.
OUTPUT_RETRIES = 2


def logprobs_param(req: SamplingParams, chat: bool) -> int | None:
    """How many alternatives per token the request wants (``None``: no logprobs).

    Chat: ``logprobs`` (bool) and ``top_logprobs`` (0–20, needs ``logprobs: true``).
    Completions (legacy API): ``logprobs`` is the number of alternatives (0–20).

    Raises:
        InvalidParameterValue: a value of the wrong type or out of range.
    """
    extra = req.model_extra or {}
    want, top = extra.get("logprobs"), extra.get("top_logprobs")

    def count(name: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOP_LOGPROBS:
            raise InvalidParameterValue(
                f"'{name}' must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {v!r}.")
        return v

    if not chat:
        return None if want is None else count("logprobs", want)
    if want is not None and not isinstance(want, bool):
        raise InvalidParameterValue(f"'logprobs' must be a boolean, got {want!r}.")
    if top is not None:
        count("top_logprobs", top)
        if not want:
            raise InvalidParameterValue("'top_logprobs' requires 'logprobs' to be true.")
    return (top or 0) if want else None


def sampling_params(req: SamplingParams, chat: bool,
                    default_max_tokens: int | None = None) -> dict[str, Any]:
    """The engine's ``params`` from request fields and ``extra_params`` (and
    ``logprobs``: alternatives per token, see :func:`logprobs_param`);
    ``default_max_tokens`` when the request sets no ``max_tokens``.

    Raises:
        InvalidParameterValue: an ``extra_params`` key the engine cannot honour.
    """
    max_tokens = req.effective_max_tokens()
    params: dict[str, Any] = {
        "max_tokens": default_max_tokens if max_tokens is None else max_tokens,
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
    top = logprobs_param(req, chat)
    if top is not None:
        params["logprobs"] = top
    return params


def _wants_logprobs(ops: list[dict[str, Any]]) -> bool:
    return bool(ops) and ops[0]["params"].get("logprobs") is not None


class _Choice:
    """One worker request plus its output index and accumulated text."""

    def __init__(self, index: int, req: WorkerRequest) -> None:
        self.index = index
        self.req = req
        self.text: list[str] = []
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list[dict[str, Any]] = []  # entries (engines/logprobs.py)


class LlamaBackend(Backend):
    """Chat and completions on a llama.cpp worker (GGUF, chat template from the file)."""

    def __init__(self, name: str, worker: WorkerPool,
                 default_max_tokens: int | None = None) -> None:
        self.name = name
        self.worker = worker
        self.default_max_tokens = default_max_tokens  # tokens, when a request sets none
        path = worker.spec.get("model_path")  # none: a scripted test engine
        self.counter = PromptCounter(path) if path else None

    def ready(self) -> bool:
        return self.worker.state == "ready"

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        """Reasoning only for models whose chat template emits ``<think>`` sections."""
        return Capabilities(chat=True, completions=True, tools=True, json_schema=True,
                            reasoning=bool(self.worker.info.get("reasoning")))

    def describe(self) -> dict[str, Any]:
        return dict(self.worker.info)

    async def prompt_tokens(self, req: ChatCompletionRequest | CompletionRequest
                            ) -> int | None:
        """Exact prompt tokens as the worker will render them (:class:`PromptCounter`, in
        a thread), plus :data:`THINK_SLACK` for a reasoning model's thinking tags."""
        if isinstance(req, ChatCompletionRequest):
            ops = self._chat_ops(req, self._plan(req))[:1]
        else:
            ops = self._completion_ops(req)[::req.n]
        if self.counter is None:
            return None
        n = await asyncio.to_thread(self.counter.count, ops)
        return None if n is None else n + THINK_SLACK * len(ops)

    def _reasoning(self, req: ChatCompletionRequest, plan: ToolPlan,
                   ops: list[dict[str, Any]]) -> int | None | bool:
        """For a reasoning model: adjust ``ops`` and return the thinking budget (None =
        unlimited); False when the model does not reason or thinking is skipped."""
        if not self.worker.info.get("reasoning"):
            return False
        thinking = requested_thinking(req.thinking, req.reasoning_effort,
                                      req.effective_max_tokens())
        constrained = plan.active or response_grammar(req.response_format) is not None
        if constrained or thinking.mode == "off":
            for op in ops:
                op["params"] = {**op["params"], "no_think": True}
            return False
        if _wants_logprobs(ops):
            raise InvalidParameterValue(
                f"'logprobs' is not available while '{self.name}' thinks; send "
                "reasoning_effort 'none' (or thinking disabled) to get logprobs.")
        return thinking.budget

    # -- request → worker ops ------------------------------------------------
    def _chat_messages(self, req: ChatCompletionRequest) -> list[dict[str, Any]]:
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
        params = sampling_params(req, chat=True, default_max_tokens=self.default_max_tokens)
        grammar = plan.grammar() or fmt_grammar
        if grammar:
            params["grammar"] = grammar
        return [{"op": "generate", "messages": messages, "params": _nth(params, j)}
                for j in range(req.n)]

    def _completion_ops(self, req: CompletionRequest) -> list[dict[str, Any]]:
        params = sampling_params(req, chat=False, default_max_tokens=self.default_max_tokens)
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
                        c.cached_tokens = ev.get("cached_tokens", 0)
                    elif ev["t"] == "tok":
                        c.text.append(ev["text"])
                        c.logprobs.extend(ev.get("lp") or ())
                    elif ev["t"] == "end":
                        c.completion_tokens = ev["completion_tokens"]
                        c.finish_reason = ev["finish_reason"]
                        break
        finally:
            for c in choices:
                c.req.close()

    @staticmethod
    def _choices_usage(choices: list[_Choice], n: int) -> dict[str, Any]:
        # The prompt is counted once per distinct prompt, not once per choice.
        return usage(sum(c.prompt_tokens for c in choices[::n]),
                     sum(c.completion_tokens for c in choices),
                     cached=sum(c.cached_tokens for c in choices[::n]))

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        plan = self._plan(req)
        ops = self._chat_ops(req, plan)
        budget = self._reasoning(req, plan, ops)
        if budget is not False:
            return await reasoned_chat(self.worker.submit, ops, budget or None)
        want_lp = _wants_logprobs(ops)
        choices = await self._submit(ops)
        await self._run_all(choices)
        await self._enforce(req, plan, ops, choices)
        out = []
        for c in choices:
            text = "".join(c.text)
            calls = plan.parse(text)
            if calls:
                choice = {"index": c.index, "message": {"role": "assistant", "content": None,
                                                        "tool_calls": calls},
                          "finish_reason": "tool_calls"}
            else:
                choice = {"index": c.index, "message": {"role": "assistant", "content": text},
                          "finish_reason": c.finish_reason}
            if want_lp:
                choice["logprobs"] = {"content": c.logprobs, "refusal": None}
            out.append(choice)
        return {
            "object": "chat.completion",
            "choices": out,
            "usage": self._choices_usage(choices, req.n),
        }

    async def _enforce(self, req: ChatCompletionRequest, plan: ToolPlan,
                       ops: list[dict[str, Any]], choices: list[_Choice]) -> None:
        """Checks every finished answer against its schema; a breaking one is sampled
        again (at most :data:`OUTPUT_RETRIES` times, with the seed offset if one was
        given), never returned.

        Raises:
            BadGateway: an answer still breaks its schema (greedy requests are not
                retried: they would give the same answer).
        """
        for attempt in range(OUTPUT_RETRIES + 1):
            bad = [(c, why) for c in choices
                   if (why := _violation(plan, req, "".join(c.text), c.finish_reason))]
            if not bad:
                return
            params = ops[0]["params"]
            if attempt == OUTPUT_RETRIES or (params.get("seed") is None and
                                             reproducible(params)):
                break
            redo = []
            for c, _ in bad:
                op = ops[c.index]
                if op["params"].get("seed") is not None:
                    op = {**op, "params": {**op["params"],
                                           "seed": op["params"]["seed"] + 7919 * (attempt + 1)}}
                redo.append(_Choice(c.index, await self.worker.submit(op)))
            await self._run_all(redo)
            for r in redo:
                choices[r.index] = r
        c, why = bad[0]
        raise BadGateway(f"The answer of '{self.name}' (choice {c.index}) {why}; this "
                         f"keyword is checked after generation, not enforced while decoding"
                         f" (attempts: {attempt + 1}).")

    async def complete(self, req: CompletionRequest) -> dict[str, Any]:
        ops = self._completion_ops(req)
        want_lp = _wants_logprobs(ops)
        choices = await self._submit(ops)
        await self._run_all(choices)
        return {
            "object": "text_completion",
            "choices": [{"index": c.index, "text": "".join(c.text),
                         "finish_reason": c.finish_reason,
                         "logprobs": completion_logprobs(c.logprobs) if want_lp else None}
                        for c in choices],
            "usage": self._choices_usage(choices, req.n),
        }

    def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[dict[str, Any]]:
        plan = self._plan(req)
        ops = self._chat_ops(req, plan)
        budget = self._reasoning(req, plan, ops)
        if budget is not False:
            return reasoned_stream(self.worker.submit, ops, budget or None)
        return self._stream(ops, req.n, chat=True, plan=plan, req=req)

    def complete_stream(self, req: CompletionRequest) -> AsyncIterator[dict[str, Any]]:
        return self._stream(self._completion_ops(req), req.n, chat=False)

    async def _stream(self, ops: list[dict[str, Any]], n: int, chat: bool,
                      plan: ToolPlan | None = None, req: ChatCompletionRequest | None = None
                      ) -> AsyncIterator[dict[str, Any]]:
        """Chunks with cumulative usage. Choices are streamed in index order.

        The first chunk is produced only after the worker accepted the first
        prompt, so prompt errors (too long for the context) still become an
        HTTP error status rather than an in-stream error. A chat answer that finished
        but breaks its schema ends the stream with an error event (BadGateway)
        instead of its last chunk.
        """
        prompt_tokens = 0
        cached_tokens = 0
        completion_tokens = 0  # cumulative over the request
        finished_tokens = 0  # tokens of choices already finished
        want_lp = _wants_logprobs(ops)
        sent_chars = 0  # generated characters of the current choice (text_offset)

        def chunk(c: _Choice, delta: dict[str, Any] | None, text: str | None,
                  finish: str | None, lp: list[dict[str, Any]] | None = None
                  ) -> dict[str, Any]:
            used = usage(prompt_tokens, completion_tokens, cached=cached_tokens)
            if chat:
                return chat_chunk(c.index, delta or {}, finish, used, lp if want_lp else None)
            return {"object": "text_completion", "choices": [{
                "index": c.index, "finish_reason": finish, "text": text or "",
                "logprobs": completion_logprobs(lp or [], sent_chars) if want_lp else None}],
                "usage": used}

        choices = await self._submit(ops)
        tools = plan is not None and plan.active
        try:
            for pos, c in enumerate(choices):
                # With tools, text that starts a call ("{" / "[") is held back and sent
                # as one tool_calls delta (with id and name) once the call is complete.
                held: list[str] | None = [] if tools else None
                held_lp: list[dict[str, Any]] = []
                decided = plan is not None and plan.mode in ("required", "named")
                sent_chars = 0
                while True:
                    ev = await c.req.next()
                    t = ev["t"]
                    if t == "start":
                        if pos % n == 0:
                            prompt_tokens += ev["prompt_tokens"]
                            cached_tokens += ev.get("cached_tokens", 0)
                        if chat:
                            yield chunk(c, {"role": "assistant", "content": ""}, None, None)
                    elif t == "tok":
                        completion_tokens = finished_tokens + ev["n"]
                        if req is not None:
                            c.text.append(ev["text"])
                        if held is not None:
                            held.append(ev["text"])
                            held_lp.extend(ev.get("lp") or ())
                            so_far = "".join(held).lstrip()
                            if decided or not so_far or so_far[0] in "{[":
                                continue
                            ev = {**ev, "text": "".join(held), "lp": held_lp}
                            held = None  # plain text: stream from here on
                        yield chunk(c, {"content": ev["text"]}, ev["text"], None, ev.get("lp"))
                        sent_chars += len(ev["text"])
                    elif t == "end":
                        finished_tokens += ev["completion_tokens"]
                        completion_tokens = finished_tokens
                        finish = ev["finish_reason"]
                        if req is not None and plan is not None:
                            why = _violation(plan, req, "".join(c.text), finish)
                            if why:
                                raise BadGateway(f"The streamed answer (choice {c.index}) "
                                                 f"{why}.")
                        if held is not None and plan is not None:
                            text = "".join(held)
                            calls = plan.parse(text)
                            if calls:
                                finish = "tool_calls"
                                yield chunk(c, {"tool_calls": [{**call, "index": k}
                                                               for k, call in enumerate(calls)]},
                                            None, None)
                            elif text:
                                yield chunk(c, {"content": text}, text, None, held_lp)
                        yield chunk(c, {}, "", finish)
                        break
        finally:
            for c in choices:
                c.req.close()


def _violation(plan: ToolPlan, req: ChatCompletionRequest, text: str,
               finish: str | None) -> str | None:
    """Why a finished (``stop``) answer breaks its tools' or ``response_format``'s
    schema; None when it conforms, or was cut (``length``, cancelled)."""
    if finish != "stop":
        return None
    if plan.active:
        calls = plan.parse(text)
        if calls:
            return plan.violation(calls)
        if plan.mode in ("required", "named"):
            return f"is not a call of the offered functions: {text[:120]!r}"
        return None
    return answer_violation(text, req.response_format)


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
