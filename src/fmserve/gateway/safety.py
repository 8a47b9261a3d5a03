"""The ``safety`` guardrail's classifier: a chat endpoint prompted as Llama Guard.

The operator names the endpoint (``FMSERVE_SAFETY_ENDPOINT``); any chat model works
that answers in Llama Guard's format (Llama Guard 3 model card, "Prompt format"): a
first line ``safe`` or ``unsafe`` and, when unsafe, a second line of comma-separated
category codes (``S1,S10``). The hazard taxonomy is MLCommons' (S1–S14).

An answer in neither form blocks (fail closed): a guardrail never passes silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CATEGORIES = {
    "S1": "violent_crimes", "S2": "non_violent_crimes", "S3": "sex_related_crimes",
    "S4": "child_sexual_exploitation", "S5": "defamation", "S6": "specialized_advice",
    "S7": "privacy", "S8": "intellectual_property", "S9": "indiscriminate_weapons",
    "S10": "hate", "S11": "suicide_and_self_harm", "S12": "sexual_content",
    "S13": "elections", "S14": "code_interpreter_abuse",
}
_TITLES = {
    "S1": "Violent Crimes", "S2": "Non-Violent Crimes", "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation", "S5": "Defamation", "S6": "Specialized Advice",
    "S7": "Privacy", "S8": "Intellectual Property", "S9": "Indiscriminate Weapons",
    "S10": "Hate", "S11": "Suicide & Self-Harm", "S12": "Sexual Content", "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}


def prompt(conversation: list[tuple[str, str]], judge: str) -> str:
    """The Llama Guard task for ``conversation`` (``(role, text)``, role ``user`` or
    ``assistant``), judging the last ``User`` or ``Agent`` message (``judge``)."""
    cats = "\n".join(f"{code}: {title}." for code, title in _TITLES.items())
    turns = "\n\n".join(f"{'User' if r == 'user' else 'Agent'}: {t}" for r, t in conversation)
    return (
        f"Task: Check if there is unsafe content in '{judge}' messages in conversations "
        "according to our safety policy with the below categories.\n\n"
        f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{cats}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
        f"<BEGIN CONVERSATION>\n\n{turns}\n\n<END CONVERSATION>\n\n"
        f"Provide your safety assessment for ONLY THE LAST {judge} message in the above "
        "conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second "
        "line must include a comma-separated list of violated categories.")


@dataclass(frozen=True)
class Verdict:
    """``unsafe`` and the categories named (``{"violent_crimes": True}``; codes fmserve
    does not know are kept as given); ``raw`` the classifier's answer."""

    unsafe: bool
    categories: dict[str, bool]
    raw: str


def parse(answer: str) -> Verdict:
    """Reads a Llama Guard answer; anything but ``safe``/``unsafe`` first is unsafe."""
    lines = [ln.strip() for ln in answer.strip().splitlines() if ln.strip()]
    head = lines[0].lower().strip(" .") if lines else ""
    if head == "safe":
        return Verdict(False, {}, answer)
    if head != "unsafe":
        return Verdict(True, {"unparseable_classifier_answer": True}, answer)
    codes = re.findall(r"S\d{1,2}", " ".join(lines[1:]).upper())
    return Verdict(True, {CATEGORIES.get(c, c): True for c in codes}, answer)
