"""Incremental detokenized text with stop sequences that may span tokens."""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Any


class StopMatcher:
    """Feeds text pieces; returns what is safe to emit and whether a stop was hit.

    Text that could be the start of a stop sequence is held back until the next
    piece decides it, so a stop split across tokens (``"Hel" + "lo"``) is found
    and never leaked to the client.
    """

    def __init__(self, stops: list[str] | None) -> None:
        self._stops = [s for s in (stops or []) if s]
        self._buf = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self._stops:
            return piece, False
        self._buf += piece
        hits = [i for i in (self._buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            out = self._buf[: min(hits)]
            self._buf = ""
            return out, True
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(self._buf)), 0, -1):
                if self._buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self._buf[: len(self._buf) - hold]
        self._buf = self._buf[len(self._buf) - hold :]
        return out, False

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out


class Utf8Decoder:
    """Bytes of successive tokens → str, holding back split multi-byte characters."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(self, data: bytes) -> str:
        return self._dec.decode(data)

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class TokenOutput:
    """One request's generated tokens → ``tok`` / ``end`` events (see ``engines/ipc.py``).

    Shared by the serial and the batched llama.cpp engines: detokenizes, applies
    stop sequences, counts completion tokens and enforces ``max_tokens``.
    ``detok(token) -> bytes`` and ``is_eog(token) -> bool`` come from the model.

    With log-probabilities (``accept(tok, lp)``, see ``engines/logprobs.py``), each
    ``tok`` event carries ``lp``: the entries of the tokens whose text it releases
    (text held back for a possible stop sequence keeps its entries until released;
    tokens of a matched stop sequence are dropped with it).
    """

    def __init__(self, rid: str, prompt_tokens: int, stops: list[str] | None, max_tokens: int,
                 emit: Callable[[dict[str, Any]], None], detok: Callable[[int], bytes],
                 is_eog: Callable[[int], bool]) -> None:
        self.rid = rid
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.count = 0
        self.done = False
        self._stops = StopMatcher(stops)
        self._dec = Utf8Decoder()
        self._emit = emit
        self._detok = detok
        self._is_eog = is_eog
        self._lps: list[dict[str, Any]] = []

    def accept(self, tok: int, lp: dict[str, Any] | None = None) -> bool:
        """Handles one sampled token (and its logprob entry); True when the request
        finished (``end`` emitted)."""
        if self._is_eog(tok):
            self.finish("stop")
            return True
        self.count += 1
        if lp is not None:
            self._lps.append(lp)
        text, hit = self._stops.feed(self._dec.decode(self._detok(tok)))
        if text:
            self._text(text)
        if hit:  # text held back for the stop sequence is dropped with it
            self._end("stop")
            return True
        if self.count >= self.max_tokens:
            self.finish("length")
            return True
        return False

    def finish(self, reason: str) -> None:
        """Ends the request: flushes held-back text (unless cancelled), emits ``end``."""
        if self.done:
            return
        if reason != "cancelled":
            tail = self._stops.flush() + self._dec.flush()
            if tail:
                self._text(tail)
        self._end(reason)

    def _text(self, text: str) -> None:
        ev: dict[str, Any] = {"t": "tok", "id": self.rid, "text": text, "n": self.count}
        if self._lps:
            ev["lp"], self._lps = self._lps, []
        self._emit(ev)

    def _end(self, reason: str) -> None:
        self.done = True
        self._emit({"t": "end", "id": self.rid, "finish_reason": reason,
                    "prompt_tokens": self.prompt_tokens, "completion_tokens": self.count})
