"""Budget steering: a JSON answer about to hit ``max_tokens`` closes instead of breaking.

A grammar guarantees an answer *that finishes* is valid; a small model that keeps
adding optional properties runs into ``max_tokens`` and the cut answer is not JSON.
When the tokens left are no more than what closing the open strings, arrays and
objects needs (plus a small margin, :data:`MARGIN`), :class:`BudgetSteer` narrows
the grammar's allowed tokens to those that only close (``"``, ``}``, ``]`` runs:
``"}``, ``]}``…) whenever the grammar allows one, else (a value is required) to the
shortest values (``[]``, ``{}``, ``""``, ``0``, ``null``…) — so the answer takes a
short way out the grammar permits at each step. Where it allows none of those (a
string under its ``minLength``, a required key to spell out) the grammar's own mask
applies, and the answer may still end with ``finish_reason: length``.

The JSON state (nesting depth, inside a string or not) is read from the bytes of
the tokens generated so far.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MARGIN = 16  # tokens of slack before steering starts (a required key costs 5-8)
# Shortest values, taken when nothing that closes is allowed (a required value).
SHORT_VALUES = frozenset({b"[]", b"{}", b'""', b"0", b"null", b"false", b"true", b"[", b"{",
                          b'"'})


@dataclass(frozen=True)
class ClosingTokens:
    """Which tokens of a vocabulary only close JSON values (booleans, n_vocab).

    Attributes:
        string: text is ``"`` then only ``"``, ``}``, ``]`` (closes a string).
        value: text is ``}`` or ``]``, then only those (closes an array or object).
        short: text is one of :data:`SHORT_VALUES` (the shortest way through a value
            the grammar requires).
    """

    string: np.ndarray
    value: np.ndarray
    short: np.ndarray

    @classmethod
    def of(cls, n_vocab: int, piece: Callable[[int], bytes]) -> ClosingTokens:
        string = np.zeros(n_vocab, dtype=bool)
        value = np.zeros(n_vocab, dtype=bool)
        short = np.zeros(n_vocab, dtype=bool)
        for tok in range(n_vocab):
            text = piece(tok).strip()
            short[tok] = text in SHORT_VALUES
            if text and all(c in b'"}]' for c in text):
                if text[:1] == b'"':
                    string[tok] = True
                else:
                    value[tok] = b'"' not in text
        return cls(string, value, short)


class BudgetSteer:
    """Per-sequence steering state (see module doc).

    Args:
        closing: the vocabulary's :class:`ClosingTokens`.
        budget: the sequence's ``max_tokens`` (tokens).
    """

    def __init__(self, closing: ClosingTokens, budget: int) -> None:
        self.closing = closing
        self.left = budget
        self.depth = 0
        self.in_string = False
        self._escape = False
        self.tracking: bool | None = None  # None: nothing seen yet; False: not JSON
        self.steered = 0  # steps it narrowed, for diagnostics

    def after(self, text: bytes) -> None:
        """Accounts one generated token (its bytes)."""
        self.left -= 1
        if self.tracking is None and text.strip():
            self.tracking = text.lstrip()[:1] in (b"{", b"[", b'"')
        if not self.tracking:
            return
        for c in text:
            if self.in_string:
                if self._escape:
                    self._escape = False
                elif c == 0x5C:  # backslash
                    self._escape = True
                elif c == 0x22:  # "
                    self.in_string = False
            elif c == 0x22:
                self.in_string = True
            elif c in (0x7B, 0x5B):  # { [
                self.depth += 1
            elif c in (0x7D, 0x5D):  # } ]
                self.depth -= 1

    @property
    def active(self) -> bool:
        """True when the tokens left only just cover closing what is open."""
        need = self.depth + (1 if self.in_string else 0)  # closers, then the end token
        return bool(self.tracking) and need > 0 and self.left <= need + 1 + MARGIN

    def narrow(self, allowed: np.ndarray) -> np.ndarray:
        """``allowed`` restricted to closing tokens when the grammar allows any, else to
        the shortest values (outside strings), else as it is."""
        closers = self.closing.string if self.in_string else self.closing.value
        for prefer in (closers, None if self.in_string else self.closing.short):
            if prefer is not None:
                both = allowed & prefer
                if both.any():
                    self.steered += 1
                    return both
        return allowed
