"""Incremental detokenized text with stop sequences that may span tokens."""

from __future__ import annotations

import codecs


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
