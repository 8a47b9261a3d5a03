"""Prompt → tokens for a GGUF model: the one rendering the worker generates from and the
gateway reserves rate-limit tokens with.

:class:`PromptRenderer` renders chat messages with the GGUF's own
``tokenizer.chat_template`` (llama-cpp-python's ``Jinja2ChatFormatter``) and tokenizes
with the model's vocabulary; completions prompts are tokenized as raw text.

:class:`PromptCounter` is the gateway side: a vocabulary-only load of the same GGUF
(``Llama(vocab_only=True)``: the tokenizer and template, no weights) in the serving
process, so a tokens-per-minute reservation is the exact prompt length the worker will
see — not an estimate.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from fmserve.engines.reasoning import think_prompt

log = logging.getLogger("fmserve.engines")


class PromptRenderer:
    """Chat template + tokenizer of one loaded ``llama_cpp.Llama`` (full or vocab-only)."""

    def __init__(self, llm: Any) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llm
        meta = llm.metadata
        template = meta.get("tokenizer.chat_template")

        def piece(tok: int) -> str:
            return llm._model.token_get_text(tok) if tok >= 0 else ""

        self.formatter = (
            Jinja2ChatFormatter(template, eos_token=piece(llm.token_eos()),
                                bos_token=piece(llm.token_bos()))
            if template else None)
        self.add_bos = meta.get("tokenizer.ggml.add_bos_token", "true") != "false"
        self.reasoning = bool(template and "<think>" in template)

    def text(self, msg: dict[str, Any]) -> tuple[str, bool]:
        """A worker op's prompt text and whether it may hold special tokens: ``messages``
        (chat: rendered with the template, adjusted for thinking — sets
        ``msg["_thinking"]``) or ``prompt`` (completions: raw text).

        Raises:
            ValueError: the model has no chat template, or the template rejects the
                messages.
        """
        if msg.get("messages") is not None:
            if self.formatter is None:
                raise ValueError("This model has no chat template; use the completions API.")
            try:
                text = self.formatter(messages=msg["messages"]).prompt
            except Exception as exc:  # jinja errors, raise_exception() in templates
                raise ValueError(f"The chat template rejected the messages: {exc}") from exc
            text, msg["_thinking"] = think_prompt(text, msg.get("params") or {})
            return text, True
        return msg.get("prompt") or "", False

    def tokens(self, msg: dict[str, Any]) -> list[int]:
        """Token ids of a worker op's prompt (see :meth:`text`; raises its errors)."""
        text, special = self.text(msg)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=special)

    def count(self, msg: dict[str, Any]) -> int:
        """``len(self.tokens(msg))`` without building the list: llama.cpp answers the
        length needed when given no room (raises :meth:`text`'s errors)."""
        from llama_cpp import llama_tokenize

        text, special = self.text(msg)
        data = text.encode("utf-8")
        return -int(llama_tokenize(self.llm._model.vocab, data, len(data), None, 0,
                                   self.add_bos, special))


class PromptCounter:
    """Counts prompt tokens in the serving process for one GGUF (``model_path``).

    The vocabulary loads on the first :meth:`count` (about 0.2 s and 20 MB here), so
    an entity without a tokens limit costs nothing; if it cannot load (a missing file
    is the worker's error to report), :meth:`count` returns None and the caller falls
    back to its upper bound.
    """

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path
        self._renderer: PromptRenderer | None = None
        self._failed = False
        self._lock = threading.Lock()

    def _load(self) -> PromptRenderer | None:
        with self._lock:
            if self._renderer is None and not self._failed:
                try:
                    from llama_cpp import Llama

                    llm = Llama(model_path=self.model_path, vocab_only=True, n_ctx=16,
                                n_batch=16, verbose=False)
                    self._renderer = PromptRenderer(llm)
                except Exception:
                    self._failed = True
                    log.warning("no prompt tokenizer for %s; reserving by bytes",
                                self.model_path, exc_info=True)
            return self._renderer

    def count(self, ops: list[dict[str, Any]]) -> int | None:
        """Prompt tokens of worker ops (the sum over distinct prompts), or None when the
        tokenizer cannot load or the template rejects the messages (the worker will
        answer that 400 itself). Blocking (llama.cpp's tokenizer: ~2 µs per prompt byte
        here; it releases the GIL): call it in a thread."""
        renderer = self._renderer or self._load()
        if renderer is None:
            return None
        try:
            return sum(renderer.count(dict(op)) for op in ops)
        except ValueError:
            return None
