"""The stream hold-back window of output guardrails (gateway/guard_stream.py), fed one
character (or a few) at a time: masked spans are never cut, blocked text never leaves,
and what is held back stays within the window plus the current word."""

from __future__ import annotations

import re

import pytest

from fmserve.gateway.guard_stream import Blocked, Scan, StreamGuard
from fmserve.gateway.pii import MAX_SPACED_SPAN, Span, mask

EMAIL = re.compile(r"[\w.]+@\w+\.\w+")
CARD = re.compile(r"\d{4} \d{4} \d{4} \d{4}")
KEYWORD = re.compile(r"(?<!\w)secret(?!\w)", re.IGNORECASE)


def pii_scan(text: str, final: bool) -> Scan:
    """A stand-in for Presidio: e-mail addresses and spaced card numbers."""
    spans = [Span(m.start(), m.end(), "EMAIL_ADDRESS") for m in EMAIL.finditer(text)]
    spans += [Span(m.start(), m.end(), "CREDIT_CARD") for m in CARD.finditer(text)]
    return Scan(spans=[s for s in spans if final or s.end < len(text)])


def keyword_scan(text: str, final: bool) -> Scan:
    hits = [m for m in KEYWORD.finditer(text) if final or m.end() < len(text)]
    return Scan(block="secret") if hits else Scan()


def run(guard: StreamGuard, text: str, size: int = 1) -> tuple[list[str], int]:
    """Feeds ``text`` in ``size``-character deltas; returns the releases and the most
    characters held back at once."""
    out, most = [], 0
    for i in range(0, len(text), size):
        out.append(guard.feed(text[i:i + size]))
        most = max(most, len(guard.held))
    out.append(guard.finish())
    return out, most


TEXT = ("Sure. Write to alice.smith@example.com or pay with 4111 1111 1111 1111 today; "
        "a very-long-address-of-someone.with.many.parts@example.org also works. ") * 3


@pytest.mark.parametrize("size", [1, 3, 7, 40])
def test_masking_matches_the_whole_text_whatever_the_deltas(size: int) -> None:
    g = StreamGuard(pii_scan, window=MAX_SPACED_SPAN)
    out, most = run(g, TEXT, size)
    full = "".join(out)
    assert full == mask(TEXT, pii_scan(TEXT, True).spans)
    assert "@" not in full and "4111" not in full
    # no release ever holds a fragment of a span: every piece masks cleanly on its own
    for piece in out:
        assert not re.search(r"\d{4}|@", piece)
    longest_word = max(len(w) for w in TEXT.split())
    assert most <= MAX_SPACED_SPAN + 16 + longest_word + size


def test_text_is_released_before_the_end() -> None:
    g = StreamGuard(pii_scan, window=MAX_SPACED_SPAN)
    text = "word " * 200
    released_early = sum(len(g.feed(text[i])) for i in range(len(text)))
    assert released_early >= len(text) - MAX_SPACED_SPAN - 16 - 5
    assert released_early + len(g.finish()) == len(text)


@pytest.mark.parametrize("size", [1, 2, 5, 64])
def test_block_mid_stream_sends_none_of_the_keyword(size: int) -> None:
    g = StreamGuard(keyword_scan, window=len("secret") + 1)
    text = "harmless words " * 20 + "and then the SECRET comes, " + "more " * 20
    sent = []
    with pytest.raises(Blocked):
        for i in range(0, len(text), size):
            sent.append(g.feed(text[i:i + size]))
        sent.append(g.finish())
    joined = "".join(sent)
    assert "SECRET" not in joined and "SECRE" not in joined
    assert joined and text.startswith(joined)  # what left before the block is the prefix


def test_keyword_as_part_of_a_word_does_not_block() -> None:
    g = StreamGuard(keyword_scan, window=7)
    text = "secretary secrets unsecret " * 5
    out, _ = run(g, text, 1)
    assert "".join(out) == text


def test_keyword_at_the_very_end_blocks() -> None:
    g = StreamGuard(keyword_scan, window=7)
    for ch in "x " * 30 + "the secret":
        g.feed(ch)
    with pytest.raises(Blocked):
        g.finish()


def test_hold_everything_for_whole_text_checks() -> None:
    g = StreamGuard(pii_scan, window=None)
    assert all(g.feed(c) == "" for c in TEXT)
    assert g.finish() == mask(TEXT, pii_scan(TEXT, True).spans)
