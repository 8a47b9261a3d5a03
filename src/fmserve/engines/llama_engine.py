"""llama.cpp engine (runs inside a worker process), via llama-cpp-python.

Spec options: ``model_path`` (GGUF), ``weights`` (``gguf`` = the file as is, or a
tensor type to load a converted copy of, see :mod:`fmserve.engines.weights`),
``n_ctx`` (tokens, default: the model's training context), ``n_threads`` (default:
all cores), ``n_batch`` (tokens).

Chat prompts are rendered with the GGUF's own ``tokenizer.chat_template``
(llama-cpp-python's ``Jinja2ChatFormatter``); completions prompts are raw text.
Generation uses ``Llama.generate`` (which reuses the KV cache for a shared
prompt prefix, except for greedy or seeded requests, which must not depend on
the previous request) with our own detokenization and stop handling, so usage
counts are exact model tokens.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

from fmserve.engines.grammar import GrammarCompiler, GrammarError, Mask
from fmserve.engines.logprobs import LogprobReader
from fmserve.engines.prompt_tokens import PromptRenderer
from fmserve.engines.sampling import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    reproducible,
)
from fmserve.engines.textstream import TokenOutput
from fmserve.engines.weights import prepare as prepare_weights

Emit = Callable[[dict[str, Any]], None]


class LlamaEngine:
    def __init__(self, spec: dict[str, Any]) -> None:
        import llama_cpp
        from llama_cpp import Llama

        self._lib = llama_cpp
        threads = int(spec.get("n_threads") or os.cpu_count() or 1)
        path = prepare_weights(spec["model_path"], spec.get("weights") or "gguf",
                               threads=threads)
        probe_ctx = int(spec.get("n_ctx") or 0)
        self.llm = Llama(
            model_path=path,
            n_ctx=probe_ctx,  # 0 = the model's training context
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=int(spec.get("n_batch") or 512),
            verbose=False,
        )
        self.n_ctx = self.llm.n_ctx()
        meta = self.llm.metadata
        self.prompts = PromptRenderer(self.llm)
        self._vocab = self.llm._model.vocab
        self.model_name = meta.get("general.name") or os.path.basename(spec["model_path"])
        self.model_file = os.path.basename(path)
        self.threads = threads
        self.reasoning = self.prompts.reasoning
        self.grammars = GrammarCompiler(self._vocab, self.llm.n_vocab(), owner=self.llm)
        self.grammars.warm()
        self.logprobs = LogprobReader(
            self.llm.n_vocab(),
            lambda row: llama_cpp.llama_get_logits_ith(self._decode_ctx(), row),
            lambda tok: self.llm.detokenize([tok]))

    def _decode_ctx(self) -> Any:
        """The llama.cpp context whose logits the last decode wrote."""
        return self.llm._ctx.ctx

    def info(self) -> dict[str, Any]:
        return {
            "engine": "llama_cpp",
            "model": self.model_name,
            "weights": self.model_file,
            "n_ctx": self.n_ctx,
            "n_threads": self.threads,
            "chat_template": self.prompts.formatter is not None,
            # A template that emits <think> sections: answers carry reasoning blocks.
            "reasoning": self.reasoning,
        }

    # -- requests -------------------------------------------------------------
    def handle(self, msg: dict[str, Any], emit: Emit, cancelled: Callable[[], bool]) -> None:
        if msg["op"] != "generate":
            raise ValueError(f"llama_cpp worker cannot do {msg['op']!r}")
        prepared = self.prepare(msg, emit)
        if prepared is None:
            return
        tokens, params, room, grammar = prepared
        emit({"t": "start", "id": msg["id"], "prompt_tokens": len(tokens),
              "thinking": msg.get("_thinking", False)})
        self._generate(msg["id"], tokens, params, room, emit, cancelled, grammar)

    def prepare(self, msg: dict[str, Any], emit: Emit, compile_grammar: bool = True
                ) -> tuple[list[int], dict[str, Any], int, Any] | None:
        """Prompt tokens, params, room left in the context (tokens) and grammar.

        Emits an ``err`` event and returns None for a prompt the template rejects, a
        prompt longer than the context, or a schema that does not compile. The grammar
        is an llguidance matcher (:mod:`fmserve.engines.grammar`), or None; with
        ``compile_grammar`` False, a future of one (compiled in a thread).
        """
        rid = msg["id"]
        try:
            tokens = self._prompt_tokens(msg)
        except ValueError as exc:
            emit({"t": "err", "id": rid, "code": "BAD_REQUEST", "message": str(exc)})
            return None
        n_prompt = len(tokens)
        room = self.n_ctx - n_prompt
        if room <= 0:
            emit({"t": "err", "id": rid, "code": "CONTEXT_LENGTH_EXCEEDED",
                  "message": f"The prompt is {n_prompt} tokens long, which does not fit the "
                             f"model's context of {self.n_ctx} tokens (at least 1 token must "
                             f"be left for the answer). Shorten the prompt."})
            return None
        params = msg.get("params") or {}
        grammar = None
        if params.get("grammar") and not compile_grammar:
            grammar = self.grammars.submit(params["grammar"])
        elif params.get("grammar"):
            try:
                grammar = self.grammars.matcher(params["grammar"])
            except GrammarError as exc:
                emit(schema_error(rid, exc))
                return None
        return tokens, params, room, grammar

    def _prompt_tokens(self, msg: dict[str, Any]) -> list[int]:
        return self.prompts.tokens(msg)

    def _generate(self, rid: str, tokens: list[int], params: dict[str, Any], room: int,
                  emit: Emit, cancelled: Callable[[], bool], grammar: Any = None) -> None:
        max_tokens = min(int(params.get("max_tokens") or room), room)
        seed = params.get("seed")
        self.llm.set_seed(int(seed) if seed is not None else random.getrandbits(31))
        temp = params.get("temperature")
        if reproducible(params):
            # Reproducible output was asked for (greedy, or a seed): evaluate the
            # prompt from scratch. A KV-cache prefix hit evaluates the prompt's tail
            # in a different batch shape, and those logits differ in the last bits,
            # enough to flip a greedy choice depending on the previous request.
            self.llm.reset()
        out = self.output(rid, len(tokens), params, max_tokens, emit)
        top = params.get("logprobs")
        masker = None if grammar is None else _MaskProcessor(
            self.grammars.constraint(grammar, max_tokens), self.llm.n_vocab())
        for tok in self.llm.generate(
            tokens,
            temp=DEFAULT_TEMPERATURE if temp is None else float(temp),
            top_p=float(params.get("top_p") or DEFAULT_TOP_P),
            top_k=int(params.get("top_k") or DEFAULT_TOP_K),
            min_p=float(params.get("min_p") or 0.0),
            repeat_penalty=float(params.get("repeat_penalty") or 1.0),
            presence_penalty=float(params.get("presence_penalty") or 0.0),
            frequency_penalty=float(params.get("frequency_penalty") or 0.0),
            logits_processor=None if masker is None else self._lib.LogitsProcessorList([masker]),
        ):
            if cancelled():
                out.finish("cancelled")
                break
            if masker is not None and not masker.consume(tok):
                emit({"t": "err", "id": rid, "code": "INTERNAL_ERROR",
                      "message": f"Grammar-constrained decoding failed: {masker.error}"})
                return
            # generate() yields right after sampling: logits row -1 produced ``tok``.
            lp = None if top is None else self.logprobs.entry(-1, tok, int(top))
            if out.accept(tok, lp):
                break
        out.finish("length")  # the context ran out (no-op when already finished)

    def output(self, rid: str, prompt_tokens: int, params: dict[str, Any], max_tokens: int,
               emit: Emit) -> TokenOutput:
        """The event writer of one request (stop sequences, max_tokens, usage)."""
        return TokenOutput(rid, prompt_tokens, params.get("stop"), max_tokens, emit,
                           detok=lambda tok: self.llm.detokenize([tok]),
                           is_eog=lambda tok: bool(self._lib.llama_vocab_is_eog(self._vocab,
                                                                                  tok)))


def schema_error(rid: str, exc: Exception) -> dict[str, Any]:
    """The ``err`` event (400) of a request whose schema cannot be compiled."""
    return {"t": "err", "id": rid, "code": "INVALID_PARAMETER_VALUE",
            "message": f"The output schema cannot be enforced: {exc}"}


class _MaskProcessor:
    """``Llama.generate`` logits processor enforcing a grammar
    (:class:`~fmserve.engines.grammar.Constraint`, budget steering included).

    llama-cpp-python calls it from a C callback, where a raised exception would be
    lost and the step left unconstrained; an error is therefore recorded, every token
    masked, and the error reported by :meth:`consume`.
    """

    def __init__(self, constraint: Any, n_vocab: int) -> None:
        self.c = constraint
        self.mask = Mask(n_vocab)
        self.error: str | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        try:
            allowed = self.mask.allowed(self.c.matcher)
            if self.c.steer.active:
                allowed = self.c.steer.narrow(allowed)
            scores[~allowed] = -float("inf")
        except GrammarError as exc:
            self.error = str(exc)
            scores[:] = -float("inf")
        return scores

    def consume(self, tok: int) -> bool:
        """Feeds the sampled token to the matcher; False when decoding must stop."""
        if self.error is None and not self.c.matcher.consume_token(tok):
            self.error = self.c.matcher.get_error() or "the grammar refused the token"
        self.c.steer.after(self.c.piece(tok))
        return self.error is None
