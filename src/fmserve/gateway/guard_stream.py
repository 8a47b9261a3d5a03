"""Output guardrails on a stream: hold back just enough text to decide, mask, emit.

A :class:`StreamGuard` sits on one choice of a streamed answer. Text it is fed is held
back until no keyword or PII span can still cover it, then released — masked — or the
stream is blocked before any of the offending text has left. What it may release after
``N`` characters have arrived is everything before the *cut*:

* at most ``N - window`` (``window`` ≥ the longest keyword + 1, and ≥ the longest PII
  span that can contain whitespace, :data:`~fmserve.gateway.pii.MAX_SPACED_SPAN`), so
  every such span touching released text has fully arrived and has been seen;
* moved back to just after a whitespace character, so no span *without* whitespace
  (an e-mail address, an IP address: of any length) is cut in two;
* moved back to the start of any detected span that would straddle it.

So a guard holds back ``window`` characters plus the rest of the current word; it scans
only the held-back text, and only once ``step`` more characters have arrived (scanning
costs about a millisecond per KB). ``window=None`` holds everything until :meth:`finish`
(guardrails that need the whole answer: safety, valid topics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fmserve.gateway.pii import Span, mask


@dataclass
class Scan:
    """What a scan of some text found: ``block`` (a reason, or None) and the PII spans
    to mask (offsets into the scanned text)."""

    block: object | None = None
    spans: list[Span] = field(default_factory=list)


# scan(text, final) -> Scan; with final=False, matches that touch the end of ``text``
# are not conclusive (the next characters may extend or undo them) and are left out.
Scanner = Callable[[str, bool], Scan]


class Blocked(Exception):
    """The scanned text must not be released; ``reason`` is the scanner's block value."""

    def __init__(self, reason: object) -> None:
        super().__init__(str(reason))
        self.reason = reason


class StreamGuard:
    """One choice's text through an output guardrail (see the module docstring).

    Raises:
        Blocked: from :meth:`feed` or :meth:`finish` when the scanner blocks; nothing
            of the offending text has been returned by then.
    """

    def __init__(self, scan: Scanner, window: int | None, step: int = 16) -> None:
        self.scan = scan
        self.window = window
        self.step = step
        self.held = ""  # arrived, not yet released; starts at a safe boundary
        self.released = 0  # characters released so far
        self.finished = False

    def feed(self, text: str) -> str:
        """Takes the next ``text`` of the answer; returns what may be sent now."""
        self.held += text
        n = len(self.held)
        if self.window is None or n < self.window + self.step:
            return ""
        found = self.scan(self.held, False)
        if found.block is not None:
            raise Blocked(found.block)
        cut = n - self.window
        while cut > 0 and not self.held[cut - 1].isspace():
            cut -= 1
        for s in sorted(found.spans, key=lambda s: s.start, reverse=True):
            if s.start < cut < s.end:
                cut = s.start
        return self._release(cut, [s for s in found.spans if s.end <= cut])

    def finish(self) -> str:
        """The answer ended: scans what is held (conclusively) and returns the rest."""
        if self.finished:
            return ""
        self.finished = True
        found = self.scan(self.held, True)
        if found.block is not None:
            raise Blocked(found.block)
        return self._release(len(self.held), found.spans)

    def _release(self, cut: int, spans: list[Span]) -> str:
        out = mask(self.held[:cut], spans) if spans else self.held[:cut]
        self.held = self.held[cut:]
        self.released += cut
        return out
