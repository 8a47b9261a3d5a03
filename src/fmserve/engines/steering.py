"""Budget steering: a JSON answer about to hit ``max_tokens`` closes instead of breaking.

A grammar guarantees an answer *that finishes* is valid; a small model that keeps
adding optional properties runs into ``max_tokens`` and the cut answer is not JSON.
When the tokens left are no more than what closing the open strings, arrays and
objects needs (plus a small margin, :data:`MARGIN`), :class:`BudgetSteer` narrows
the grammar's allowed tokens to those that only close (``"``, ``}``, ``]`` runs:
``"}``, ``]}``…), whenever the grammar allows one — so the answer takes the
shortest way out the grammar permits at each step. Where it allows none (a required
property is still missing, a string is under its ``minLength``) the grammar's own
mask applies, and the answer may still end with ``finish_reason: length``.

The JSON state (nesting depth, inside a string or not) is read from the bytes of
the tokens generated so far.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MARGIN = 3  # tokens of slack before steering starts


@dataclass(frozen=True)
class ClosingTokens:
    """Which tokens of a vocabulary only close JSON values (booleans, n_vocab).

    Attributes:
        string: text is ``"`` then only ``"``, ``}``, ``]`` (closes a string).
        value: text is ``}`` or ``]``, then only those (closes an array or object).
    """

    string: np.ndarray
    value: np.ndarray

    @classmethod
    def of(cls, n_vocab: int, piece: Callable[[int], bytes]) -> ClosingTokens:
        string = np.zeros(n_vocab, dtype=bool)
        value = np.zeros(n_vocab, dtype=bool)
        for tok in range(n_vocab):
            text = piece(tok).strip()
            if text and all(c in b'"}]' for c in text):
                if text[:1] == b'"':
                    string[tok] = True
                else:
                    value[tok] = b'"' not in text
        return cls(string, value)


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
        need = self.depth + (1 if self.in_string else 0)
        return bool(self.tracking) and need > 0 and self.left <= need + MARGIN

    def narrow(self, allowed: np.ndarray) -> np.ndarray:
        """``allowed`` restricted to closing tokens, when the grammar allows any."""
        closers = self.closing.string if self.in_string else self.closing.value
        both = allowed & closers
        if both.any():
            self.steered += 1
            return both
        return allowed
