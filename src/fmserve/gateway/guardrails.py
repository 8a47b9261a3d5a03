"""AI Gateway guardrails (governance §1.4): block, mask, on the input and the output.

Each side (``guardrails.input`` / ``guardrails.output``) may set:

* ``invalid_keywords`` — case-insensitive whole-word match (``(?<!\\w)kw(?!\\w)``) on the
  text the model sees (every message's text, the prompt, the embeddings input) or the
  text it returns: a match blocks.
* ``pii.behavior`` — ``BLOCK`` or ``MASK`` (``NONE``: off), with Presidio pattern
  recognizers (``gateway/pii.py`` lists the entity types). ``MASK`` replaces each span
  with ``<ENTITY_TYPE>`` in what the model receives (input) or the client receives
  (output), and the request succeeds.
* ``valid_topics`` — the last user message (the prompt; the answer, on the output side)
  is embedded by the topic embeddings endpoint (the bundled ``databricks-all-minilm-l6-v2``
  unless configured) with the topics; when its best cosine similarity is under
  :data:`TOPIC_THRESHOLD` it is off every topic and blocked.
* ``safety`` — the conversation is classified by the safety endpoint
  (``FMSERVE_SAFETY_ENDPOINT``, prompted as Llama Guard: ``gateway/safety.py``).

Checks run in that order; the first that blocks decides. A block is
:class:`GuardrailTriggered`: HTTP 400 ``BAD_REQUEST`` whose ``message`` is a JSON string
``{"usage", "input_guardrail"|"output_guardrail": [entry], "finishReason":
"input_guardrail_triggered"|"output_guardrail_triggered"}``, each entry ``{"flagged",
"categories", "category_scores", "pii_detection", "anonymized_input"}`` (a PII block:
``flagged`` false, ``pii_detection`` true, the masked messages; a keyword block also
names the ``invalid_keywords`` found). On the output side the answer is never echoed
(``anonymized_output`` is null).

Streams: :meth:`Guardrails.guard_stream` holds back just enough text
(``gateway/guard_stream.py``); output ``valid_topics``/``safety`` need the whole answer, so
with either set a stream's text is held until the answer is complete. A block mid-stream
raises from the stream (the HTTP layer ends it with an error event).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np
import orjson

from fmserve.errors import BadRequest, InvalidParameterValue
from fmserve.gateway import safety
from fmserve.gateway.guard_stream import Blocked, Scan, Scanner, StreamGuard
from fmserve.gateway.pii import MAX_SPACED_SPAN, PiiDetector, Span, mask

Body = dict[str, Any]

# Best cosine similarity (all-MiniLM-L6-v2, normalized vectors) a request needs to one of
# the valid topics. Chosen on bench/topics_sample.json (60 labelled queries, 3 topic
# sets; bench/calibrate_topics.py): on-topic queries score 0.35 median, off-topic ones
# 0.09 median and 0.21 at most; 0.18 classifies 54/60 right (5 on-topic blocked, 1
# off-topic passed) — the best of any threshold on that sample.
TOPIC_THRESHOLD = 0.18
_INLINE_CHARS = 16_384  # PII scans of longer inputs run in a worker thread


class GuardrailTriggered(BadRequest):
    """A guardrail blocked the request (``side`` ``input``) or the answer (``output``)."""

    def __init__(self, side: str, entry: dict[str, Any],
                 usage: dict[str, Any] | None = None) -> None:
        self.side = side
        self.entry = entry
        self.usage = usage or {"prompt_tokens": 0, "total_tokens": 0}
        super().__init__(orjson.dumps({
            "usage": self.usage, f"{side}_guardrail": [entry],
            "finishReason": f"{side}_guardrail_triggered"}).decode())


class GuardrailModels(Protocol):
    """The models guardrails call (``serving/`` provides them from its endpoints)."""

    def embeddings_problem(self) -> str | None:
        """Why ``valid_topics`` cannot be checked now, or None."""

    def safety_problem(self) -> str | None:
        """Why ``safety`` cannot be checked now, or None."""

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Vectors of ``texts``, shape (len(texts), dims)."""

    async def classify(self, prompt: str) -> str:
        """The safety endpoint's answer to one user message ``prompt``."""


@dataclass(frozen=True)
class SideRules:
    """One side's guardrails, compiled."""

    keywords: tuple[str, ...] = ()
    pii: str = "NONE"
    topics: tuple[str, ...] = ()
    safety: bool = False
    keyword_re: re.Pattern[str] | None = field(init=False, compare=False, default=None)

    def __post_init__(self) -> None:
        alt = "|".join(re.escape(k) for k in sorted(self.keywords, key=len, reverse=True))
        object.__setattr__(self, "keyword_re", re.compile(
            rf"(?<!\w)(?:{alt})(?!\w)", re.IGNORECASE) if alt else None)

    @property
    def active(self) -> bool:
        return bool(self.keywords or self.pii in ("BLOCK", "MASK") or self.topics
                    or self.safety)

    @property
    def whole_text(self) -> bool:
        """Whether a check needs the whole text (no release before the end)."""
        return bool(self.topics or self.safety)

    def window(self) -> int | None:
        """Characters a stream holds back (None: all of it)."""
        if self.whole_text:
            return None
        longest = max((len(k) for k in self.keywords), default=0) + 1
        return max(longest, MAX_SPACED_SPAN if self.pii in ("BLOCK", "MASK") else 0)


def _rules(side: dict[str, Any] | None) -> SideRules | None:
    if not side:
        return None
    r = SideRules(tuple(side.get("invalid_keywords") or ()),
                  ((side.get("pii") or {}).get("behavior") or "NONE"),
                  tuple(side.get("valid_topics") or ()), bool(side.get("safety")))
    return r if r.active else None


def _entry(flagged: bool, categories: dict[str, Any] | None = None,
           scores: dict[str, float] | None = None, pii: bool = False,
           anonymized: list[dict[str, str]] | None = None, side: str = "input",
           **extra: Any) -> dict[str, Any]:
    return {"flagged": flagged, "categories": categories, "category_scores": scores,
            "pii_detection": pii, f"anonymized_{side}": anonymized, **extra}


@dataclass
class _Slot:
    """One piece of input text and how to replace it."""

    role: str
    text: str
    put: Callable[[str], None]


def _slots(kind: str, req: Any) -> list[_Slot]:
    out: list[_Slot] = []
    if kind == "chat":
        for m in req.messages:
            if isinstance(m.content, str):
                out.append(_Slot(m.role, m.content, partial(setattr, m, "content")))
            elif isinstance(m.content, list):
                out += [_Slot(m.role, p.text, partial(setattr, p, "text"))
                        for p in m.content if p.type == "text" and p.text]
        return out
    attr = "prompt" if kind == "completions" else "input"
    value = getattr(req, attr)
    if isinstance(value, str):
        return [_Slot("user", value, lambda t: setattr(req, attr, t))]

    def put_at(i: int) -> Callable[[str], None]:
        return lambda t: getattr(req, attr).__setitem__(i, t)
    return [_Slot("user", v, put_at(i)) for i, v in enumerate(value) if isinstance(v, str)]


class Guardrails:
    """Guardrails of every endpoint (compiled per config, cached).

    ``models``: the embeddings and safety endpoints (None: neither available).
    ``pii``: the PII detector (loaded on first use, in a thread).
    """

    def __init__(self, models: GuardrailModels | None = None, pii: PiiDetector | None = None,
                 topic_threshold: float = TOPIC_THRESHOLD) -> None:
        self.models = models
        self.pii = pii or PiiDetector()
        self.topic_threshold = topic_threshold
        self._compiled: dict[bytes, tuple[SideRules | None, SideRules | None]] = {}
        self._topic_vectors: dict[str, np.ndarray] = {}

    # -- config ------------------------------------------------------------------------
    def rules(self, ai_gateway: dict[str, Any] | None
              ) -> tuple[SideRules | None, SideRules | None]:
        """``(input, output)`` rules of an endpoint's AI Gateway config (None: none)."""
        g = (ai_gateway or {}).get("guardrails")
        if not g:
            return None, None
        key = orjson.dumps(g, option=orjson.OPT_SORT_KEYS)
        hit = self._compiled.get(key)
        if hit is None:
            if len(self._compiled) > 1024:
                self._compiled.clear()
            hit = self._compiled[key] = (_rules(g.get("input")), _rules(g.get("output")))
        return hit

    async def check_config(self, guardrails: dict[str, Any] | None) -> None:
        """Config-time checks that need the server (the shape is checked by
        ``protocol/management.py``); loads the PII detector when a side uses it.

        Raises:
            InvalidParameterValue: 400 naming the field, for ``valid_topics`` without an
                embeddings endpoint or ``safety`` without a safety endpoint.
        """
        for side in ("input", "output"):
            r = _rules((guardrails or {}).get(side))
            if r is None:
                continue
            if r.topics:
                problem = self.models.embeddings_problem() if self.models else \
                    "no embeddings endpoint is available"
                if problem:
                    raise InvalidParameterValue(
                        f"guardrails.{side}.valid_topics: {problem}; topics are checked "
                        "with the embeddings of a served embeddings endpoint.")
            if r.safety:
                problem = self.models.safety_problem() if self.models else \
                    "no safety endpoint is configured"
                if problem:
                    raise InvalidParameterValue(
                        f"guardrails.{side}.safety: {problem}. Name a chat endpoint that "
                        "answers as a Llama Guard classifier with FMSERVE_SAFETY_ENDPOINT "
                        "(fmserve serve --safety-endpoint) to enable the safety filter.")
            if r.pii in ("BLOCK", "MASK") and not self.pii.loaded:
                await asyncio.to_thread(self.pii.load)

    # -- input -----------------------------------------------------------------------
    async def check_input(self, ai_gateway: dict[str, Any] | None, kind: str,
                          req: Any) -> None:
        """Input guardrails on a parsed request; ``MASK`` rewrites ``req`` in place.

        Raises:
            GuardrailTriggered: 400 when a guardrail blocks.
        """
        rules = self.rules(ai_gateway)[0]
        if rules is None:
            return
        slots = _slots(kind, req)
        if rules.keyword_re is not None:
            found = sorted({m.group(0).lower() for s in slots
                            for m in rules.keyword_re.finditer(s.text)})
            if found:
                raise GuardrailTriggered("input", _entry(
                    True, {"invalid_keywords": True}, invalid_keywords=found))
        if rules.pii in ("BLOCK", "MASK"):
            spans = await self._find_pii([s.text for s in slots])
            if any(spans):
                masked = [mask(s.text, sp) if sp else s.text
                          for s, sp in zip(slots, spans, strict=True)]
                if rules.pii == "BLOCK":
                    raise GuardrailTriggered("input", _entry(
                        False, pii=True, anonymized=[{"role": s.role, "content": t}
                                                     for s, t in zip(slots, masked, strict=True)]))
                for s, sp, t in zip(slots, spans, masked, strict=True):
                    if sp:
                        s.put(t)
                        s.text = t
        if rules.topics:
            users = [s.text for s in slots if s.role == "user"] or [s.text for s in slots]
            await self._check_topics(rules, "input", users[-1] if kind == "chat" and users
                                     else "\n".join(users), None)
        if rules.safety:
            conv = [(s.role, s.text) for s in slots if s.role in ("user", "assistant")]
            await self._check_safety("input", conv or [("user", "")], "User", None)

    async def _find_pii(self, texts: list[str]) -> list[list[Span]]:
        if not self.pii.loaded or sum(len(t) for t in texts) > _INLINE_CHARS:
            return await asyncio.to_thread(lambda: [self.pii.find(t) for t in texts])
        return [self.pii.find(t) for t in texts]

    async def _check_topics(self, rules: SideRules, side: str, text: str,
                            usage: dict[str, Any] | None) -> None:
        assert self.models is not None
        missing = [t for t in rules.topics if t not in self._topic_vectors]
        vectors = await self.models.embed([text, *missing])
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        if len(self._topic_vectors) > 4096:
            self._topic_vectors.clear()
        for t, v in zip(missing, vectors[1:], strict=True):
            self._topic_vectors[t] = v
        topics = np.stack([self._topic_vectors[t] for t in rules.topics])
        best = float((topics @ vectors[0]).max())
        if best < self.topic_threshold:
            raise GuardrailTriggered(side, _entry(
                True, {"off_topic": True}, {"topic_similarity": round(best, 4)}, side=side),
                usage)

    async def _check_safety(self, side: str, conversation: list[tuple[str, str]],
                            judge: str, usage: dict[str, Any] | None) -> None:
        assert self.models is not None
        verdict = safety.parse(await self.models.classify(safety.prompt(conversation, judge)))
        if verdict.unsafe:
            raise GuardrailTriggered(side, _entry(True, verdict.categories, side=side), usage)

    # -- output ----------------------------------------------------------------------
    def _scanner(self, rules: SideRules) -> Scanner:
        kw = rules.keyword_re

        def scan(text: str, final: bool) -> Scan:
            n = len(text)
            if kw is not None:
                found = sorted({m.group(0).lower() for m in kw.finditer(text)
                                if final or m.end() < n})
                if found:
                    return Scan(block=_entry(True, {"invalid_keywords": True}, side="output",
                                             invalid_keywords=found))
            if rules.pii in ("BLOCK", "MASK"):
                spans = [s for s in self.pii.find(text) if final or s.end < n]
                if spans and rules.pii == "BLOCK":
                    return Scan(block=_entry(False, pii=True, side="output"))
                return Scan(spans=spans)
            return Scan()
        return scan

    async def _whole(self, rules: SideRules, text: str, req: Any,
                     usage: dict[str, Any] | None) -> None:
        if rules.topics:
            await self._check_topics(rules, "output", text, usage)
        if rules.safety:
            conv = [(s.role, s.text) for s in _slots("chat", req) if s.role == "user"][-1:] \
                if req is not None and hasattr(req, "messages") else []
            await self._check_safety("output", [*conv, ("assistant", text)], "Agent", usage)

    async def check_output(self, ai_gateway: dict[str, Any] | None, body: Body,
                           req: Any = None) -> Body:
        """Output guardrails on a complete answer (chat or completions); returns the body,
        masked where ``MASK`` applies.

        Raises:
            GuardrailTriggered: 400 (with the answer's ``usage``) when a guardrail blocks.
        """
        rules = self.rules(ai_gateway)[1]
        if rules is None or "choices" not in body:
            return body
        if rules.pii in ("BLOCK", "MASK") and not self.pii.loaded:
            await asyncio.to_thread(self.pii.load)
        scan = self._scanner(rules)
        usage = body.get("usage")
        choices = []
        for choice in body["choices"]:
            msg = choice.get("message")
            text = msg.get("content") if isinstance(msg, dict) else choice.get("text")
            if isinstance(text, str) and text:
                found = scan(text, True)
                if found.block is not None:
                    raise GuardrailTriggered("output", found.block, usage)  # type: ignore[arg-type]
                if found.spans:
                    text = mask(text, found.spans)
                    choice = ({**choice, "message": {**msg, "content": text}}
                              if isinstance(msg, dict) else {**choice, "text": text})
                if rules.whole_text:
                    await self._whole(rules, text, req, usage)
            choices.append(choice)
        return {**body, "choices": choices}

    def guard_stream(self, ai_gateway: dict[str, Any] | None, chunks: AsyncIterator[Body],
                     req: Any = None) -> AsyncIterator[Body]:
        """The stream through the output guardrails (``chunks`` itself when none)."""
        rules = self.rules(ai_gateway)[1]
        if rules is None:
            return chunks
        return self._guarded(rules, chunks, req)

    async def _guarded(self, rules: SideRules, chunks: AsyncIterator[Body],
                       req: Any) -> AsyncIterator[Body]:
        if rules.pii in ("BLOCK", "MASK") and not self.pii.loaded:
            await asyncio.to_thread(self.pii.load)
        scan, window = self._scanner(rules), rules.window()
        guards: dict[int, StreamGuard] = {}
        usage: dict[str, Any] | None = None
        head: Body = {}
        chat = req is not None and hasattr(req, "messages")

        async def finish(g: StreamGuard) -> str:
            rest = g.finish()
            if rules.whole_text:
                await self._whole(rules, rest, req, usage)
            return rest

        try:
            async for chunk in chunks:
                usage = chunk.get("usage") or usage
                head = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
                choices = []
                for choice in chunk.get("choices") or []:
                    g = guards.setdefault(choice.get("index", 0), StreamGuard(scan, window))
                    delta = choice.get("delta")
                    key = "content" if isinstance(delta, dict) else "text"
                    holder = dict(delta) if isinstance(delta, dict) else dict(choice)
                    text = holder.get(key)
                    out = g.feed(text) if isinstance(text, str) and text else text
                    if choice.get("finish_reason") is not None:
                        out = (out or "") + await finish(g)
                    if isinstance(text, str) or out:
                        holder[key] = out
                    choice = {**choice, "delta": holder} if isinstance(delta, dict) else holder
                    choices.append(choice)
                yield {**chunk, "choices": choices} if "choices" in chunk else chunk
            for index, g in guards.items():  # a stream that ended without finish_reason
                rest = "" if g.finished else await finish(g)
                if rest:
                    part: Body = {"delta": {"content": rest}} if chat else {"text": rest}
                    yield {**head, "choices": [{"index": index, **part,
                                                "finish_reason": None}]}
        except Blocked as exc:
            raise GuardrailTriggered("output", exc.reason, usage) from None  # type: ignore[arg-type]
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
