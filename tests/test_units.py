"""Pure functions: stop sequences across tokens, UTF-8 across tokens, auth headers."""

from __future__ import annotations

import base64

import pytest

from fmserve.engines.textstream import StopMatcher, Utf8Decoder
from fmserve.errors import InvalidParameterValue, Unauthenticated
from fmserve.gateway.auth import token_from_header
from fmserve.protocol.chat import ChatCompletionRequest
from fmserve.protocol.validation import parse_model


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit:
            return "".join(out), True
    out.append(m.flush())
    return "".join(out), False


@pytest.mark.parametrize(
    ("stops", "pieces", "expected"),
    [
        (["Paris"], ["The capital is Pa", "ris."], ("The capital is ", True)),
        (["\n\n"], ["a\n", "\nb"], ("a", True)),
        (["END"], ["E", "N", "D"], ("", True)),
        (["END"], ["EN", "x"], ("ENx", False)),  # held back, then released
        (["abc", "b"], ["ab"], ("a", True)),  # the earliest stop wins
        ([], ["no", " stops"], ("no stops", False)),
    ],
)
def test_stop_sequences_span_tokens(stops: list[str], pieces: list[str],
                                    expected: tuple[str, bool]) -> None:
    assert run(stops, pieces) == expected


def test_utf8_split_across_tokens() -> None:
    data = "héllo ✓".encode()
    dec = Utf8Decoder()
    text = "".join(dec.decode(data[i:i + 1]) for i in range(len(data))) + dec.flush()
    assert text == "héllo ✓"


def test_auth_headers() -> None:
    assert token_from_header("Bearer dapi123") == "dapi123"
    basic = base64.b64encode(b"token:dapi456").decode()
    assert token_from_header(f"Basic {basic}") == "dapi456"
    for bad in (None, "", "Bearer", "Digest x", "Basic !!!", "Basic " +
                base64.b64encode(b"nopassword").decode()):
        with pytest.raises(Unauthenticated):
            token_from_header(bad)


def test_validation_names_the_field() -> None:
    with pytest.raises(InvalidParameterValue, match="'messages\\[0\\].role'"):
        parse_model(ChatCompletionRequest, {"messages": [{"role": "robot", "content": "x"}]})
    with pytest.raises(InvalidParameterValue, match="'temperature'"):
        parse_model(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}],
                                            "temperature": 3})
    with pytest.raises(InvalidParameterValue, match="Missing required parameter 'messages'"):
        parse_model(ChatCompletionRequest, {})
    req = parse_model(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}],
                                              "stop": "END", "stream_options": {}})
    assert req.stop == ["END"]


def test_token_output_events() -> None:
    from fmserve.engines.textstream import TokenOutput

    pieces = {1: b"The ", 2: b"E", 3: b"N", 4: b"D", 9: b""}
    for toks, stops, max_tokens, expected_text, expected_finish in [
        ([1, 2, 3, 4], ["END"], 10, "The ", "stop"),  # a stop spanning tokens is dropped
        ([1, 2, 3, 9], ["END"], 10, "The EN", "stop"),  # EOS: held-back text is flushed
        ([1, 2, 3, 4], None, 3, "The EN", "length"),
    ]:
        events: list[dict] = []  # type: ignore[type-arg]
        out = TokenOutput("r", 5, stops, max_tokens, events.append, detok=lambda t: pieces[t],
                          is_eog=lambda t: t == 9)
        for t in toks:
            if out.accept(t):
                break
        out.finish("length")  # no-op once finished
        assert "".join(e["text"] for e in events if e["t"] == "tok") == expected_text
        ends = [e for e in events if e["t"] == "end"]
        assert len(ends) == 1 and ends[0]["finish_reason"] == expected_finish
        assert ends[0]["prompt_tokens"] == 5


def test_requested_thinking_one_reading_for_engines_and_providers() -> None:
    from fmserve.protocol.responses import EFFORT_BUDGET, effort_for, requested_thinking

    assert requested_thinking(None, None, 100).mode == "default"
    assert requested_thinking(None, "none", 100).mode == "off"
    assert requested_thinking({"type": "disabled"}, "high", 100).mode == "off"
    on = requested_thinking(None, "minimal", None)
    assert (on.mode, on.budget, on.explicit) == ("on", 1024, False)
    t = requested_thinking({"type": "enabled", "budget_tokens": 50}, None, 100)
    assert (t.mode, t.budget, t.explicit) == ("on", 50, True)
    assert requested_thinking({"type": "adaptive"}, None, 100) == requested_thinking(
        {"type": "adaptive"}, "low", None)
    for bad, why in (({"type": "maybe"}, "thinking.type"),
                     ({"type": "enabled"}, "positive integer"),
                     ({"type": "enabled", "budget_tokens": True}, "positive integer"),
                     ({"type": "enabled", "budget_tokens": 100}, "less than max_tokens")):
        with pytest.raises(InvalidParameterValue, match=why):
            requested_thinking(bad, None, 100)
    # The reverse table (budget -> effort, for OpenAI) agrees with the forward one.
    assert [effort_for(EFFORT_BUDGET[e]) for e in ("low", "medium", "high")] == \
        ["low", "medium", "high"]
    assert effort_for(None) == "high" and effort_for(1) == "low"
