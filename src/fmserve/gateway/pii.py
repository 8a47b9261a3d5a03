"""PII detection and masking for the ``pii`` guardrail, with Microsoft Presidio, offline.

Presidio's analyzer runs its *pattern* recognizers on a no-op NLP engine: no spaCy
model is downloaded or loaded (``en_core_web_*`` is not on PyPI), so there is no
named-entity model and no ``PERSON``/``LOCATION`` detection. The recognizers shipped,
and the entity types (placeholders) they produce:

==================  ===============================================================
``EMAIL_ADDRESS``   Presidio ``EmailRecognizer`` (domain checked against the bundled
                    public-suffix snapshot, never fetched)
``PHONE_NUMBER``    fmserve's :class:`PhonePatternRecognizer`: international (``+…``)
                    and separated national numbers (``(212) 555-0199``,
                    ``415-555-0100``), each validated by ``phonenumbers``
``CREDIT_CARD``     Presidio ``CreditCardRecognizer`` (Luhn-checked)
``IBAN_CODE``       Presidio ``IbanRecognizer`` (checksum-checked)
``IP_ADDRESS``      Presidio ``IpRecognizer`` (IPv4, IPv6)
``US_SSN``          Presidio ``UsSsnRecognizer`` (``123-45-6789`` forms; known-invalid
                    numbers rejected)
``CRYPTO``          Presidio ``CryptoRecognizer`` (Bitcoin addresses, checksum-checked)
``MAC_ADDRESS``     Presidio ``MacAddressRecognizer``
==================  ===============================================================

URLs are not treated as personal data (a link in an answer is no PII; an address's
domain is caught as part of ``EMAIL_ADDRESS``). Matches scoring under
:data:`SCORE_THRESHOLD` are ignored.

Presidio's package imports ``transformers`` and ``torch`` when they are installed (they
are, for the embeddings worker), which costs seconds and hundreds of MB in the serving
process for engines this module never uses: :func:`_import_presidio` hides them during
that import. Loading happens once, in a worker thread (:meth:`PiiDetector.load`).
"""

from __future__ import annotations

import re
import sys
import threading
from dataclasses import dataclass
from typing import Any

SCORE_THRESHOLD = 0.4
# Longest PII span that may contain whitespace (IBAN: 34 characters in groups of 4 = 42;
# card numbers 23; phone numbers 40). Spans without whitespace (email, IP, crypto, MAC)
# never cross a whitespace boundary, whatever their length: the stream window relies on
# both facts (gateway/guard_stream.py).
MAX_SPACED_SPAN = 48

ENTITY_TYPES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS",
                "US_SSN", "CRYPTO", "MAC_ADDRESS")

# Cheap triggers (stdlib ``re``, a few microseconds per KB): a recognizer runs only on text
# its trigger matches, each a superset of what the recognizer can match. Most text has no
# PII, and Presidio's patterns cost about 1 ms per KB each.
_DIGITS7 = re.compile(r"\d(?:[ .()+/-]{0,3}\d){6}")
_TRIGGERS: dict[str, re.Pattern[str]] = {  # each starts with a rare character: fails fast
    "EMAIL_ADDRESS": re.compile("@"),
    "PHONE_NUMBER": _DIGITS7,
    "CREDIT_CARD": _DIGITS7,
    "US_SSN": _DIGITS7,
    "IBAN_CODE": re.compile(r"\d{2}(?<=[A-Za-z]{2}\d{2})"),
    "IP_ADDRESS": re.compile(r"\d\.\d{1,3}\.\d|:[0-9A-Fa-f]{0,4}:"),
    "CRYPTO": re.compile(r"[13][0-9A-Za-z]{25}|bc1[0-9a-z]{25}"),
    "MAC_ADDRESS": re.compile(r"[:.-](?<=[0-9A-Fa-f]{2}[:.-])[0-9A-Fa-f]{2}"),
}


def candidates(text: str) -> list[str]:
    """The entity types whose trigger matches ``text`` (the recognizers worth running)."""
    seen: dict[re.Pattern[str], bool] = {}
    out = []
    for entity, trigger in _TRIGGERS.items():
        hit = seen.get(trigger)
        if hit is None:
            hit = seen[trigger] = trigger.search(text) is not None
        if hit:
            out.append(entity)
    return out


@dataclass(frozen=True)
class Span:
    """``text[start:end]`` is PII of ``entity_type`` (character offsets)."""

    start: int
    end: int
    entity_type: str


def mask(text: str, spans: list[Span]) -> str:
    """``text`` with each span replaced by ``<ENTITY_TYPE>``; overlapping spans merge
    into the first (earliest, then longest) one."""
    out, pos = [], 0
    for s in sorted(spans, key=lambda s: (s.start, -s.end)):
        if s.start < pos:
            continue
        out += [text[pos:s.start], f"<{s.entity_type}>"]
        pos = s.end
    out.append(text[pos:])
    return "".join(out)


def _import_presidio() -> Any:
    hidden = [m for m in ("torch", "transformers") if m not in sys.modules]
    for m in hidden:
        sys.modules[m] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        import presidio_analyzer
    finally:
        for m in hidden:
            if sys.modules.get(m) is None:
                del sys.modules[m]
    return presidio_analyzer


def _build() -> Any:
    """The Presidio ``AnalyzerEngine`` with the recognizers listed above. Blocking."""
    pa = _import_presidio()
    import phonenumbers
    import tldextract
    from presidio_analyzer.nlp_engine import NoOpNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        CryptoRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        MacAddressRecognizer,
        UsSsnRecognizer,
    )

    offline_tlds = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):  # type: ignore[misc]
        """Presidio's email recognizer, its domain check on the bundled suffix list."""

        def validate_result(self, pattern_text: str) -> bool:
            return bool(offline_tlds(pattern_text).fqdn)

    class PhonePatternRecognizer(pa.PatternRecognizer):  # type: ignore[misc,name-defined]
        """Phone numbers by pattern, validated by ``phonenumbers`` (Presidio's own
        ``PhoneRecognizer`` runs libphonenumber's matcher over the whole text for eight
        regions: ~30 ms per KB of text with digits, against well under 1 ms here)."""

        PATTERNS = [
            pa.Pattern("phone (international)",
                       r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){1,5}(?![\w])", 0.6),
            pa.Pattern("phone (national, separated)",
                       r"(?<![\w+])(?:\(\d{2,5}\)[ .-]?|\d{2,5}[ .-])\d{2,5}(?:[ .-]\d{2,5}){0,3}"
                       r"(?![\w])", 0.6),
        ]

        def __init__(self) -> None:
            super().__init__(supported_entity="PHONE_NUMBER", patterns=self.PATTERNS,
                             supported_language="en", name="PhonePatternRecognizer")

        def validate_result(self, pattern_text: str) -> bool:
            digits = sum(c.isdigit() for c in pattern_text)
            if not 7 <= digits <= 15:
                return False
            try:
                n = phonenumbers.parse(pattern_text, "US")
            except phonenumbers.NumberParseException:
                return False
            return bool(phonenumbers.is_valid_number(n))

    registry = pa.RecognizerRegistry(supported_languages=["en"])
    for r in (OfflineEmailRecognizer(), PhonePatternRecognizer(), CreditCardRecognizer(),
              IbanRecognizer(), IpRecognizer(), UsSsnRecognizer(), CryptoRecognizer(),
              MacAddressRecognizer()):
        registry.add_recognizer(r)
    nlp = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
    nlp.load()
    return pa.AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=["en"],
                             default_score_threshold=SCORE_THRESHOLD)


class PiiDetector:
    """Finds PII spans in text. :meth:`load` first (a few seconds, once); then
    :meth:`find` is CPU work of about 1 ms per KB of text."""

    def __init__(self) -> None:
        self._engine: Any = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def load(self) -> None:
        """Builds the analyzer (idempotent; blocking: call it in a thread)."""
        with self._lock:
            if self._engine is None:
                self._engine = _build()

    def find(self, text: str) -> list[Span]:
        """The PII spans of ``text`` (loads first if needed)."""
        entities = candidates(text) if text else []
        if not entities:
            return []
        if self._engine is None:
            self.load()
        results = self._engine.analyze(text=text, language="en", entities=entities)
        return [Span(r.start, r.end, r.entity_type) for r in results]
